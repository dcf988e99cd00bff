"""Tests of colearn.breeding.mixture: a routed pair saved, loaded and exported as one checkpoint, and a run whose
offspring falls back to a mixture (merge.fallback=mixture) writing, exporting and reloading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from colearn import loop
from colearn.breeding.mixture import load_mixture, read_manifest, save_mixture
from colearn.cli.export import main as export_main
from colearn.config import Config, EnvConfig, EnvSpec, EvalConfig, LoopConfig, MergeConfig, PartnerSpec, RolloutConfig
from colearn.errors import ColearnError
from colearn.experience.evaluate import evaluate, normalized_by_env
from colearn.models.build import build_ancestor, load_pretrained
from colearn.models.directories import MIXTURE_MANIFEST, is_mixture
from colearn.models.partner import Partner
from tests.conftest import LAKE_ID, tiny_model_config
from tests.test_integrate import ACTIONS, LINE_OBS, MIRROR_OBS, trained

OBS = LINE_OBS + MIRROR_OBS


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def same_weights(x: Partner, y: Partner) -> bool:
    sx, sy = x.model.state_dict(), y.model.state_dict()
    return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


@pytest.fixture(scope="module")
def pair(ancestor, model_cfg) -> tuple[Partner, Partner]:
    """(L, R): L goes left on every observation and is sure of it; R goes right, less surely."""
    model, tokenizer = ancestor
    base = Partner("base", model, tokenizer, model_cfg)
    left = trained(base, "L", ["MirrorLine"], dict.fromkeys(OBS, [1.0, 0.0, 0.0, 0.0]))
    right = trained(base, "R", ["Line"], dict.fromkeys(OBS, [0.1, 0.1, 0.7, 0.1]))
    left.optimizer = torch.optim.Adam(left.model.parameters())  # training state a mixture must not carry
    return left, right


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixture") / "offspring"
    save_mixture(list(pair), {"MirrorLine": "L", "Line": "R"}, path)
    return path


def test_saved_mixture_is_a_manifest_and_one_hf_directory_per_member(saved):
    manifest = json.loads((saved / MIXTURE_MANIFEST).read_text())
    assert manifest["format"] == "colearn-mixture" and manifest["mode"] == "route"
    assert manifest["members"] == ["L", "R"] and manifest["env_map"] == {"MirrorLine": "L", "Line": "R"}
    assert "more confident member" in manifest["unmapped_envs"]  # what decides an env the table does not name
    assert is_mixture(saved) and not is_mixture(saved / "members" / "L")
    for name in ("L", "R"):
        assert (saved / "members" / name / "config.json").is_file()
    assert not list(saved.rglob("optimizer.pt"))


def test_loaded_mixture_acts_in_each_env_as_that_envs_member(pair, saved, model_cfg):
    left, right = pair
    policy = load_mixture(saved, model_cfg)
    assert [m.name for m in policy.members] == ["L", "R"] and policy.mode == "route"
    assert same_weights(policy.members[0], left) and same_weights(policy.members[1], right)
    assert set(policy.envs) == {"Line", "MirrorLine"} and policy.members[0].envs == ["MirrorLine"]
    on_mirror = policy.in_env("MirrorLine").act(OBS, ACTIONS, True, gen())
    on_line = policy.in_env("Line").act(OBS, ACTIONS, True, gen())
    assert on_mirror.texts == left.act(OBS, ACTIONS, True, gen()).texts == ["left"] * len(OBS)
    assert on_line.texts == right.act(OBS, ACTIONS, True, gen()).texts == ["right"] * len(OBS)
    assert on_line.logprobs == pytest.approx(right.act(OBS, ACTIONS, True, gen()).logprobs, abs=1e-6)
    # an env the table does not name goes to the surer member, L
    assert policy.in_env("Elsewhere").act(OBS, ACTIONS, True, gen()).texts == ["left"] * len(OBS)


def test_a_mixture_is_not_one_model(saved, model_cfg):
    with pytest.raises(ColearnError, match=r"mixture.*load_mixture"):
        Partner.load(saved, "offspring", model_cfg)
    with pytest.raises(ColearnError, match=r"model.source=.*mixture.*members/<name>"):
        load_pretrained(str(saved))
    member = Partner.load(saved / "members" / "R", "R", model_cfg)  # each member alone is an HF directory
    assert same_weights(member, load_mixture(saved, model_cfg).members[1])


def test_lora_members_round_trip_as_adapters(corpus, tmp_path):
    from colearn.models.weights import dense_state

    cfg = tiny_model_config(lora_rank=2)
    members = []
    for seed, name in ((1, "A"), (2, "B")):
        model, tokenizer = build_ancestor(cfg, *corpus, seed=0)
        with torch.no_grad():  # move each adapter away from the identity, differently
            for n, param in model.named_parameters():
                if "lora_B" in n:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        members.append(Partner(name, model.eval(), tokenizer, cfg))
    save_mixture(members, {"Line": "A", "MirrorLine": "B"}, tmp_path)
    assert (tmp_path / "members" / "B" / "adapter_config.json").is_file()
    loaded = load_mixture(tmp_path, cfg).members
    for before, after in zip(members, loaded):
        assert hasattr(after.model, "peft_config")
        want, got = dense_state(before), dense_state(after)
        assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k]) for k in want)
    assert not torch.allclose(
        dense_state(loaded[0])["model.layers.0.self_attn.q_proj.weight"],
        dense_state(loaded[1])["model.layers.0.self_attn.q_proj.weight"],
    )


def test_mixture_mistakes_are_user_errors(pair, tmp_path):
    with pytest.raises(ColearnError, match=r"'Line': 'C'.*\['L', 'R'\]"):
        save_mixture(list(pair), {"Line": "C"}, tmp_path / "bad")
    with pytest.raises(ColearnError, match="has no mixture.json"):
        load_mixture(tmp_path, tiny_model_config())
    (tmp_path / MIXTURE_MANIFEST).write_text(json.dumps({"format": "something-else", "mode": "route"}))
    with pytest.raises(ColearnError, match="not a colearn-mixture manifest"):
        read_manifest(tmp_path)


# --- a run that falls back to a mixture, and its export ---------------------------------------------------

LINES = [EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]}), EnvSpec(LAKE_ID, "MirrorLine", {"desc": ["GFS"]})]


def mixture_run_config() -> Config:
    """Independent partners on mirrored lines, never 0.99-cosine alike: they fall back to a mixture."""
    env = EnvConfig(suite=LINES, partners=[PartnerSpec("A", ["Line"]), PartnerSpec("B", ["MirrorLine"])])
    return Config(
        model=tiny_model_config(),
        env=env,
        loop=LoopConfig(generations=1, rounds=1, exchange=False),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        eval=EvalConfig(episodes=2, sampled=True),
        progress=False,
        merge=MergeConfig(compat_metric="cosine", compat_threshold=0.99, fallback="mixture"),
    )


@pytest.fixture(scope="module")
def mixture_run(ancestor, pair, tmp_path_factory) -> tuple[Path, loop.LoopState]:
    """A run whose partners start as specialists: A goes right (solves Line), B goes left (solves MirrorLine)."""
    left, right = pair
    cfg = mixture_run_config()
    model, tokenizer = ancestor
    start = loop.LoopState(
        0,
        0,
        Partner("ancestor", model, tokenizer, cfg.model),
        [right.clone("A", ["Line"]), left.clone("B", ["MirrorLine"])],
    )
    run_dir = tmp_path_factory.mktemp("mixture_run")
    return run_dir, loop.run(cfg, run_dir, start)


def test_a_mixture_fallback_is_saved_as_the_routed_partners(mixture_run):
    run_dir, state = mixture_run
    node = json.loads((run_dir / "lineage.json").read_text())[0]
    assert node["recipe"]["outcome"] == "fallback" and node["recipe"]["mixture"] == {"Line": "A", "MirrorLine": "B"}
    # each specialist solves only its own line; the routed pair solves both
    assert node["parent_scores"] == {"A": {"Line": 1.0, "MirrorLine": 0.0}, "B": {"Line": 0.0, "MirrorLine": 1.0}}
    assert node["scores"] == {"Line": 1.0, "MirrorLine": 1.0}
    gen0 = run_dir / "checkpoints" / "gen_0000"
    manifest = json.loads((gen0 / "offspring" / MIXTURE_MANIFEST).read_text())
    assert manifest["members"] == ["A", "B"] and manifest["env_map"] == node["recipe"]["mixture"]
    cfg = mixture_run_config().model
    mixture = load_mixture(gen0 / "offspring", cfg)
    for member in mixture.members:
        assert same_weights(member, Partner.load(gen0 / member.name, member.name, cfg))
    # the next generation still starts from one set of weights: the best partner's
    assert same_weights(state.ancestor, Partner.load(gen0 / node["recipe"]["source"], "best", cfg))
    assert json.loads((run_dir / "deployed.json").read_text())["path"] == "checkpoints/gen_0000/offspring"


def test_exported_mixture_loads_and_scores_what_the_lineage_says(mixture_run, tmp_path, capsys):
    run_dir, _ = mixture_run
    out = tmp_path / "exported"
    export_main([str(run_dir), str(out)])
    printed = capsys.readouterr().out
    assert f"exported generation 0 to {out}: a mixture of A, B" in printed and "load_mixture" in printed
    assert is_mixture(out) and not list(out.rglob("optimizer.pt"))
    card = (out / "README.md").read_text()
    assert "## Routing" in card and "| Line | A |" in card and "| MirrorLine | B |" in card
    assert "load_mixture(" in card and "## Lineage" in card
    cfg = mixture_run_config()
    policy = load_mixture(out, cfg.model)
    scores = [s for spec in LINES for s in evaluate(policy.in_env(spec.name), [spec], cfg.eval, cfg.rollout)]
    assert normalized_by_env(scores) == {"Line": 1.0, "MirrorLine": 1.0}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sampled = {
        e["env"]: e["mean_return"]
        for e in logged
        if e["event"] == "eval" and e["partner"] == "offspring" and e["policy"] == "sampled"
    }
    assert {s.env: s.mean_return for s in scores if s.policy == "sampled"} == sampled
