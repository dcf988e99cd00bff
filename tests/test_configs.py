"""Every config group option and experiment preset composes, passes the checks, and every preset runs."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from colearn import config, loop
from colearn.cli.experiment import CONF_DIR, register_configs, to_config, validate
from colearn.config import MergeConfig
from colearn.errors import ColearnError
from colearn.experience.store import ExperienceStore

CONF = Path(CONF_DIR)
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("model", "env", "learn", "merge", "pretrain")}
NEEDS_SOURCE = {o for o in GROUPS["model"] if OmegaConf.load(CONF / "model" / f"{o}.yaml").source == ""}
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TINY = [
    "loop.generations=2",
    "loop.rounds=1",
    "rollout.episodes=8",
    "rollout.group_size=4",
    "rollout.num_envs=8",
    "eval.episodes=1",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "probe_size=4",
]


def composed(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_checks(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option in NEEDS_SOURCE:  # a local directory (tests/test_architectures.py loads each)
        with pytest.raises(ColearnError, match="model.source is empty"):
            composed(overrides)
        cfg = composed([*overrides, "model.source=/nonexistent"])
        assert cfg.model.source == "/nonexistent"
        return
    cfg = composed(overrides)
    validate(cfg)
    if group == "merge":
        assert cfg.merge.method == ("none" if option == "none" else option)


CLOSED_SETS = [  # (override, field, the value as the error quotes it, the valid names in order)
    ("merge.method=tie", "merge.method", "'tie'", config.MERGE_METHODS),
    ("merge.base_method=evolve", "merge.base_method", "'evolve'", config.MERGE_OPERATORS),
    ("merge.fallback=average", "merge.fallback", "'average'", config.FALLBACKS),
    ("merge.compat_metric=cca", "merge.compat_metric", "'cca'", config.COMPAT_METRICS),
    ("merge.lora_offspring=both", "merge.lora_offspring", "'both'", config.LORA_OFFSPRING),
    ("integrate.modes=[route,vote]", "integrate.modes", "'vote'", config.INTEGRATE_MODES),
    ("integrate.average=median", "integrate.average", "'median'", config.ENSEMBLE_AVERAGES),
    ("learn.advantage=td", "learn.advantage", "'td'", config.ADVANTAGES),
    ("learn.advantage_norm=minmax", "learn.advantage_norm", "'minmax'", config.ADVANTAGE_NORMS),
    ("learn.distill_from=teacher", "learn.distill_from", "'teacher'", config.DISTILL_SOURCES),
    ("learn.distill_select=best", "learn.distill_select", "'best'", config.DISTILL_SELECTIONS),
    ("rollout.mode=free", "rollout.mode", "'free'", config.ROLLOUT_MODES),
    ("rollout.vectorization=threads", "rollout.vectorization", "'threads'", config.VECTORIZATIONS),
    ("model.dtype=float64", "model.dtype", "'float64'", config.DTYPES),
    ("model.autocast=float16", "model.autocast", "'float16'", config.AUTOCASTS),
    ("device=gpu", "device", "'gpu'", config.DEVICES),
    ("device=cuda:x", "device", "'cuda:x'", config.DEVICES),
    ("backend=dask", "backend", "'dask'", config.BACKENDS),
]


@pytest.mark.parametrize("override,field,value,names", CLOSED_SETS, ids=[c[0] for c in CLOSED_SETS])
def test_a_value_outside_a_closed_set_fails_at_composition_naming_the_valid_ones(override, field, value, names):
    # composition alone (Hydra + the dataclass checks) rejects it: no env, model or run is touched
    with pytest.raises(ColearnError) as error:
        composed([override])
    assert str(error.value) == f"{field}: {value} is not one of {', '.join(names)}"


def test_closed_sets_name_what_the_registries_hold():
    from colearn.backends.registry import BACKENDS
    from colearn.breeding.integrate import MODES
    from colearn.merging.operators import METHODS

    assert set(config.BACKENDS) == set(BACKENDS)
    assert set(config.MERGE_OPERATORS) == set(METHODS)
    assert set(config.INTEGRATE_MODES) == set(MODES)
    assert set(config.MERGE_METHODS) - set(METHODS) == {"none", "evolve"}
    assert set(GROUPS["merge"]) <= set(config.MERGE_METHODS)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "auto"])
def test_every_documented_device_passes_composition(device):
    assert composed([f"device={device}"]).device == device


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["backend=ray", "device=cuda"], "device=cuda with backend=ray gives the actors no GPU; set ray.num_gpus"),
        (["backend=ray", "ray.num_gpus=0.5"], "ray.num_gpus=0.5 needs device=cuda or auto (it is cpu)"),
        (["backend=ray", "ray.num_cpus=-1"], "ray.num_cpus=-1.0 and ray.num_gpus=0.0 must be >= 0"),
    ],
)
def test_ray_resources_that_cannot_work_fail_at_composition(overrides, message):
    with pytest.raises(ColearnError, match=re.escape(message)):
        composed(overrides)
    assert composed(["backend=ray", "device=cuda", "ray.num_gpus=0.5", "ray.address=auto"]).ray.num_gpus == 0.5


def test_pretraining_rounds_without_envs_fail_at_composition_naming_the_fix():
    with pytest.raises(ColearnError, match=re.escape("pretrain.rounds=3 needs pretrain.suite")):
        composed(["pretrain.rounds=3"])
    assert [e.name for e in composed(["pretrain=four_lakes"]).pretrain.suite] == ["P1", "P1m", "P2", "P2m"]


def test_the_deterministic_learner_drops_the_kl_stop_for_a_floor_and_a_negative_floor_fails():
    learn = composed(["learn=deterministic"]).learn
    assert (learn.target_kl, learn.advantage_floor) == (0.0, 0.1)
    assert (composed([]).learn.target_kl, composed([]).learn.advantage_floor) == (0.05, 0.0)
    with pytest.raises(ColearnError, match=re.escape("learn.advantage_floor=-0.1 must be >= 0")):
        composed(["learn.advantage_floor=-0.1"])


@functools.cache
def merge_option(option: str) -> MergeConfig:
    return composed([f"merge={option}"]).merge


@pytest.mark.parametrize("preset", PRESETS)
def test_a_merge_option_given_with_a_preset_is_the_merge_that_runs(preset):
    # a preset selects its merge with `override /merge: ...`, so `-m experiment=full merge=ties,slerp` sweeps
    # merges; a preset setting merge values instead would run linear merges with TIES's density
    for option in GROUPS["merge"]:
        assert composed([f"experiment={preset}", f"merge={option}"]).merge == merge_option(option)


def test_full_merges_with_ties_when_asked_and_with_its_own_merge_otherwise():
    ties = composed(["experiment=full", "merge=ties"]).merge
    assert (ties.method, ties.density) == ("ties", 0.5)
    alone = composed(["experiment=full"])
    assert alone.merge == merge_option("linear") and alone.loop.exchange
    assert composed(["experiment=merging_only"]).merge.method == "linear"
    assert composed(["experiment=independent", "merge=slerp"]).merge.method == "slerp"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs_end_to_end(preset, tmp_path):
    cfg = composed([f"experiment={preset}", *TINY, "progress=false"])
    validate(cfg)
    state = loop.run(cfg, tmp_path)
    lineage = json.loads((tmp_path / "lineage.json").read_text())
    assert [n["generation"] for n in lineage] == [0, 1]
    assert state.generation == 2 and "offspring" in state.last_scores
    recipes = [n["recipe"] for n in lineage]
    if cfg.merge.method == "none" or len(cfg.env.partners) == 1:
        assert [(r["method"], r["outcome"]) for r in recipes] == [("copy_best", "copy")] * 2
    else:
        # every generation merged with the configured method, or tried it and the gate refused the offspring
        tried = [r if r["outcome"] == "merged" else r["attempted"] for r in recipes]
        assert [(t["method"], t["density"]) for t in tried] == [(cfg.merge.method, cfg.merge.density)] * 2
        assert all(r["gate"]["passed"] == (r["outcome"] == "merged") for r in recipes)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    learn = [e for e in events if e["event"] == "learn"]
    assert len(learn) == len(cfg.env.partners) * cfg.loop.generations * cfg.loop.rounds
    # each partner trained on its own steps, the other's steps exactly when it sees them, and its distillation set
    rows = ExperienceStore(tmp_path / "experience").select()
    steps = Counter((r["generation"], r["round"], r["partner"]) for r in rows)
    sees_peer = cfg.loop.exchange and bool(cfg.learn.peer_rl_coef)
    assert cfg.learn.advantage == "gae"  # GAE keeps every step; the critic-free advantages drop those at 0
    for e in learn:
        name, here = e["partner"], (e["generation"], e["round"])
        peer = sum(n for (g, r, p), n in steps.items() if (g, r) == here and p != name)
        expected = (
            steps[(*here, name)] * bool(cfg.learn.rl_coef)
            + peer * sees_peer
            + e[f"learn/distill_rows/{name}"] * bool(cfg.learn.distill_coef)
        )
        assert e[f"learn/rows/{name}"] == expected and steps[(*here, name)] > 0
        if not cfg.loop.exchange:
            assert e[f"loss/peer_rl/{name}"] == 0.0


def test_lora_partners_can_keep_the_offspring_as_an_adapter_on_the_unchanged_base(tmp_path):
    from safetensors.torch import load_file

    cfg = composed(
        [
            "model=tiny_lora",
            "model.lora_rank=2",
            "merge.lora_offspring=adapter",
            "merge.gate=false",
            *TINY,
            "loop.generations=1",
            "progress=false",
        ]
    )
    loop.run(cfg, tmp_path)
    recipe = json.loads((tmp_path / "lineage.json").read_text())[0]["recipe"]
    assert recipe["outcome"] == "merged" and recipe["lora"]["lora_offspring"] == "adapter"
    assert recipe["lora"]["rank"] == 2 and 0.0 <= recipe["lora"]["truncation_error"] < 1.0
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    merge = next(e for e in events if e["event"] == "merge")
    assert merge["merge/lora/truncation_error"] == recipe["lora"]["truncation_error"]
    gen = tmp_path / "checkpoints" / "gen_0000"
    assert (gen / "offspring" / "adapter_config.json").is_file()
    ancestor, child = (load_file(gen / n / "base" / "model.safetensors") for n in ("ancestor", "offspring"))
    assert ancestor.keys() == child.keys() and all((ancestor[k] == child[k]).all() for k in ancestor)
