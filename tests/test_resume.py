"""Continual deployment: crash-safe checkpoints, exact resume after SIGKILL, SIGTERM, curriculum, export."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from colearn import loop
from colearn.config import (
    Config,
    EnvConfig,
    EnvSpec,
    EvalConfig,
    LoopConfig,
    PartnerSpec,
    PretrainConfig,
    RolloutConfig,
    Stage,
)
from colearn.experience.store import ExperienceStore
from colearn.rundir.checkpoint import latest_intact
from tests.conftest import LAKE_ID, tiny_model_config

TINY = [
    "loop.generations=2",
    "loop.rounds=2",
    "rollout.episodes=16",
    "rollout.group_size=4",
    "rollout.num_envs=16",
    "eval.episodes=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "progress=false",
]
CLI = [sys.executable, "-m", "colearn.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def events(run_dir: Path) -> list[tuple]:
    """The run's metrics without wall-clock times (which differ between runs by nature): each event's `time`,
    and the per-phase seconds of the timing events."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        tuple(sorted((k, json.dumps(v)) for k, v in r.items() if k != "time" and not k.startswith("time/")))
        for r in rows
    ]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run([*CLI, f"hydra.run.dir={run_dir}", *TINY], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_killed_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, f"hydra.run.dir={run_dir}", *TINY], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(run_dir / "checkpoints" / "round_g0000_r001", proc)
    time.sleep(random.Random(7).uniform(0.0, 2.0))  # a seeded moment somewhere in the next round
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*CLI, "resume", str(run_dir)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert events(run_dir) == events(uninterrupted)
    for gen in ("gen_0000", "gen_0001"):
        a = load_file(uninterrupted / "checkpoints" / gen / "offspring" / "model.safetensors")
        b = load_file(run_dir / "checkpoints" / gen / "offspring" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [(r["episode_id"], r["step"]) for r in ExperienceStore(run_dir / "experience").table().to_pylist()]
    expected = [(r["episode_id"], r["step"]) for r in ExperienceStore(uninterrupted / "experience").table().to_pylist()]
    assert len(steps) == len(set(steps)) and steps == expected  # none missing, none doubled


def test_runs_started_at_once_in_one_directory_leave_it_to_the_first(uninterrupted, tmp_path):
    """Two `colearn resume` and a `colearn hydra.run.dir=` into one run directory: whichever takes it first
    runs to the end as if alone; the others stop with one line naming its pid and touch nothing."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    shutil.copy(uninterrupted / ".hydra" / "config.yaml", run_dir / ".hydra" / "config.yaml")
    commands = [
        [*CLI, "resume", str(run_dir)],
        [*CLI, "resume", str(run_dir)],
        [*CLI, f"hydra.run.dir={run_dir}", *TINY],
    ]
    procs = [subprocess.Popen(c, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2, 2], errors
    winner = procs[codes.index(0)]
    for code, err in zip(codes, errors):
        if code:
            assert err.strip().splitlines() == [err.strip()] and f"in use by process {winner.pid}" in err, err
    assert events(run_dir) == events(uninterrupted)
    steps = [(r["episode_id"], r["step"]) for r in ExperienceStore(run_dir / "experience").table().to_pylist()]
    expected = [(r["episode_id"], r["step"]) for r in ExperienceStore(uninterrupted / "experience").table().to_pylist()]
    assert steps == expected


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, f"hydra.run.dir={run_dir}", *TINY], env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(run_dir / "checkpoints" / "round_g0000_r001", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out and "colearn resume" in out
    newest = latest_intact(run_dir / "checkpoints")
    assert newest is not None
    state = json.loads((newest / "state.json").read_text())
    assert (state["generation"], state["round"]) < (2, 0)  # it stopped early, at a round boundary
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == state["metrics_lines"]


def tiny_config(generations: int = 1, rounds: int = 2, **env) -> Config:
    suite = [EnvSpec(LAKE_ID, "Lake"), EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]})]
    env_cfg = EnvConfig(suite=suite, partners=[PartnerSpec("A", ["Lake"]), PartnerSpec("B", ["Line"])], **env)
    return Config(
        model=tiny_model_config(),
        env=env_cfg,
        loop=LoopConfig(generations=generations, rounds=rounds),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        eval=EvalConfig(episodes=1),
        progress=False,
    )


def test_a_damaged_checkpoint_falls_back_to_the_last_good_one(tmp_path, capsys):
    loop.run(tiny_config(), tmp_path)
    root = tmp_path / "checkpoints"
    newest = latest_intact(root)
    weights = newest / "partners" / "A" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = bytes(10)  # a torn write: the last bytes are lost
    weights.write_bytes(bytes(data))
    fallback = latest_intact(root)
    assert fallback is not None and fallback != newest and fallback.name < newest.name
    assert "damaged" in capsys.readouterr().out
    state = loop.resume_state(tiny_config(), tmp_path)
    meta = json.loads((fallback / "state.json").read_text())
    assert (state.generation, state.round) == (meta["generation"], meta["round"])
    assert len(ExperienceStore(tmp_path / "experience").shards) == meta["experience_shards"]


def test_curriculum_moves_partners_to_new_envs(tmp_path):
    stage = Stage(generation=1, partners=[PartnerSpec("A", ["Line"]), PartnerSpec("B", ["Lake"])])
    loop.run(tiny_config(generations=2, rounds=1, schedule=[stage]), tmp_path)
    rows = ExperienceStore(tmp_path / "experience").table().select(["generation", "partner", "env"]).to_pylist()
    acted = {(r["generation"], r["partner"], r["env"]) for r in rows}
    assert acted == {(0, "A", "Lake"), (0, "B", "Line"), (1, "A", "Line"), (1, "B", "Lake")}
    dynamics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(
        k.startswith("forgetting/") for e in dynamics if e["event"] == "dynamics" and e["generation"] == 1 for k in e
    )


def test_export_writes_a_model_that_loads_and_generates(uninterrupted, tmp_path):
    out = tmp_path / "exported"
    done = subprocess.run([*CLI, "export", str(uninterrupted), str(out)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    card = (out / "README.md").read_text()
    assert "## Lineage" in card and "## Recipe" in card and "Lake" in card
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("PFFF\nFHFH\nFFFH\nHFFG\nP at row 0 col 0\nAction:", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 2
    deployed = json.loads((uninterrupted / "deployed.json").read_text())
    assert f"generation {deployed['generation']}" in card


def pretrained_config() -> Config:
    other = EnvSpec(LAKE_ID, "Other", {"desc": ["SFF", "FHF", "FFG"]})
    return dataclasses.replace(tiny_config(rounds=1), pretrain=PretrainConfig(suite=[other], rounds=2))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_partners_start_from_the_pretrained_ancestor(tmp_path):
    loop.run(pretrained_config(), tmp_path)
    pre = tmp_path / "pretrain"
    acted = {r["env"] for r in ExperienceStore(pre / "experience").table().select(["env"]).to_pylist()}
    assert acted == {"Other"}
    acted = {r["env"] for r in ExperienceStore(tmp_path / "experience").table().select(["env"]).to_pylist()}
    assert acted == {"Lake", "Line"}
    pretrained = weights(pre / "checkpoints" / "gen_0000" / "offspring")
    untrained = weights(pre / "checkpoints" / "gen_0000" / "ancestor")
    ancestor = weights(tmp_path / "checkpoints" / "gen_0000" / "ancestor")
    assert all(torch.equal(ancestor[k], pretrained[k]) for k in pretrained)
    assert not all(torch.equal(untrained[k], pretrained[k]) for k in pretrained)  # pretraining moved it


def test_a_run_stopped_in_pretraining_resumes_exactly(tmp_path):
    uninterrupted = tmp_path / "a" / "run"
    loop.run(pretrained_config(), uninterrupted)
    run_dir = tmp_path / "b" / "run"

    def stop_after_first_pretraining_round() -> None:
        start = time.time()
        while not (run_dir / "pretrain" / "checkpoints" / "round_g0000_r001").exists() and time.time() - start < 240:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_after_first_pretraining_round)
    stopper.start()
    stopped = loop.run(pretrained_config(), run_dir)
    stopper.join()
    assert stopped.stopped_by == "SIGTERM" and stopped.partners == []
    assert not (run_dir / "checkpoints").exists()  # the run itself had not started
    loop.run(pretrained_config(), run_dir)
    for sub in ("pretrain", "."):
        assert events(run_dir / sub) == events(uninterrupted / sub)
    final = weights(run_dir / "checkpoints" / "gen_0000" / "offspring")
    expected = weights(uninterrupted / "checkpoints" / "gen_0000" / "offspring")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
