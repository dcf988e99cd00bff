"""Nothing lost, no one in: a held run directory, resumes that delete nothing they cannot replace, exports
that overwrite nothing, model directories whose code never runs, and the run_id of `colearn resume .`.

Runs are in-process and tiny (two generations of one round: a couple of seconds); the concurrent-resume
case, which needs two processes, is in test_resume.py."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colearn import loop
from colearn.config import Config, MergeConfig
from colearn.errors import ColearnError
from colearn.experience.store import ExperienceStore
from colearn.rundir.deployment import deploys
from colearn.rundir.runlock import RunLock, holder
from colearn.rundir.signals import StopOnSignal
from tests.test_resume import tiny_config


def events(run_dir: Path) -> list[dict]:
    """The run's metrics without wall-clock times (which differ between runs by nature)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


def steps(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["episode_id"], r["step"]) for r in ExperienceStore(run_dir / "experience").table().to_pylist()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def two_generations(merge: str = "linear", keep_generations: int = 0) -> Config:
    cfg = tiny_config(generations=2, rounds=1)
    return dataclasses.replace(
        cfg, merge=MergeConfig(method=merge), loop=dataclasses.replace(cfg.loop, keep_generations=keep_generations)
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-generation run (merged offspring, gen dirs without optimizer state)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    loop.run(two_generations(), run_dir)
    return run_dir


# --- one process at a time ----------------------------------------------------------------------------


def test_a_held_run_directory_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ColearnError, match=f"in use by process {os.getpid()}"):
            loop.run(two_generations(), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before writing anything
    with RunLock(tmp_path):  # released when the holder's block ended
        pass


def test_the_lock_dies_with_its_process_even_when_a_forked_child_lives_on(tmp_path):
    pid = os.fork()
    if pid == 0:  # a run: holds the directory, forks a worker (rollout.vectorization=async) and is killed
        try:
            RunLock(tmp_path).__enter__()
            if os.fork() == 0:
                time.sleep(3)  # outlives the run
                os._exit(0)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert holder(tmp_path) is None
    with RunLock(tmp_path):
        pass


# --- resume deletes nothing it cannot replace -----------------------------------------------------------


@pytest.mark.parametrize("merge,keep", [("linear", 0), ("none", 2)], ids=["merged", "partners_go_on"])
def test_resume_without_round_checkpoints_continues_from_the_newest_generation(tmp_path, capsys, merge, keep):
    cfg = two_generations(merge, keep)
    straight = tmp_path / "straight"
    loop.run(cfg, straight)
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    # as if killed during generation 1 with every round checkpoint lost: gen_0000 is the newest survivor
    for d in [*run_dir.glob("checkpoints/round_*"), run_dir / "checkpoints" / "gen_0001"]:
        shutil.rmtree(d)
    capsys.readouterr()

    state = loop.resume_state(cfg, run_dir)
    assert (state.generation, state.round) == (1, 0)
    assert "continuing from checkpoints/gen_0000" in capsys.readouterr().out
    meta = json.loads((straight / "checkpoints" / "gen_0000" / "resume.json").read_text())
    assert events(run_dir) == events(straight)[: meta["metrics_lines"]]
    assert steps(run_dir) == steps(straight)[: len(steps(run_dir))]
    assert len(ExperienceStore(run_dir / "experience").shards) == meta["experience_shards"]

    loop.run(cfg, run_dir)
    assert events(run_dir) == events(straight)
    assert steps(run_dir) == steps(straight)
    a, b = (weights(d / "checkpoints" / "gen_0001" / "offspring") for d in (straight, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_no_checkpoint_at_all_refuses_and_deletes_nothing(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    shards = sorted(p.name for p in (run_dir / "experience").iterdir())

    with pytest.raises(ColearnError, match="--restart"):
        loop.run(two_generations(), run_dir)
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run_dir / "experience").iterdir()) == shards

    assert loop.resume_state(two_generations(), run_dir, restart=True) is None  # asked for: start over
    assert (run_dir / "metrics.jsonl").read_text() == "" and not ExperienceStore(run_dir / "experience").shards


def test_optimizer_state_is_kept_in_round_checkpoints_not_generation_ones(finished, tmp_path):
    assert not list(finished.glob("checkpoints/gen_*/*/optimizer.pt"))
    assert list(finished.glob("checkpoints/round_*/partners/*/optimizer.pt"))
    loop.run(two_generations("none", keep_generations=1), tmp_path)  # the newest one keeps it, when asked
    kept = {p.parent.parent.name for p in tmp_path.glob("checkpoints/gen_*/*/optimizer.pt")}
    assert kept == {"gen_0001"}  # gen_0000 is gone, or (deployed) kept without its optimizer state


# --- export overwrites nothing ---------------------------------------------------------------------------


def fake_run(root: Path, deployed: bool = True) -> Path:
    """A run directory with one generation's offspring (export only copies it) and, optionally, deployed.json."""
    run_dir = root / "run"
    offspring = run_dir / "checkpoints" / "gen_0000" / "offspring"
    offspring.mkdir(parents=True)
    (offspring / "config.json").write_text("{}")
    if deployed:
        (run_dir / "deployed.json").write_text(json.dumps({"generation": 0}))
    return run_dir


def test_export_refuses_a_non_empty_out_and_leaves_it_as_it_was(tmp_path):
    from colearn.cli import export

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ColearnError, match="not an empty directory"):
        export.main([str(fake_run(tmp_path)), str(out)])
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


def test_export_without_a_deployed_generation_asks_for_one(tmp_path):
    from colearn.cli import export

    run_dir = fake_run(tmp_path, deployed=False)
    with pytest.raises(ColearnError, match="--generation"):
        export.main([str(run_dir), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    export.main([str(run_dir), str(tmp_path / "out"), "--generation", "0"])
    assert (tmp_path / "out" / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # nothing left aside


# --- no code from a model directory runs ------------------------------------------------------------------


@pytest.fixture
def custom_code_dir(tmp_path, tokenizer) -> Path:
    """A model directory whose config maps to its own Python code, which would leave a marker if it ran."""
    d = tmp_path / "custom"
    tokenizer.save_pretrained(d)
    marker = tmp_path / "code_ran"
    (d / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil'\n"
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "configuration_evil.EvilConfig",
                },
            }
        )
    )
    return d


@pytest.mark.parametrize("loader", ["load_pretrained", "partner_load"])
def test_a_model_dir_needing_its_own_code_is_refused_without_asking(custom_code_dir, monkeypatch, loader):
    from colearn.config import ModelConfig
    from colearn.models.build import load_pretrained
    from colearn.models.partner import Partner

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")  # a user who would say yes
    with pytest.raises(ColearnError, match="auto_map"):
        if loader == "load_pretrained":
            load_pretrained(str(custom_code_dir))
        else:
            Partner.load(custom_code_dir, "A", ModelConfig(source=str(custom_code_dir)))
    assert not asked
    assert not (custom_code_dir.parent / "code_ran").exists()


# --- run_id, signals ----------------------------------------------------------------------------------------


def test_resume_from_inside_the_run_dir_keeps_its_name_as_run_id(tmp_path, monkeypatch):
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    loop.run(tiny_config(generations=1, rounds=1), Path("."))
    assert {r["run_id"] for r in ExperienceStore(run_dir / "experience").table().to_pylist()} == {"myrun"}


def test_a_second_signal_stops_at_once_with_one_line(capsys):
    with StopOnSignal(Path("RUN")) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "colearn: stopped at once by a second SIGTERM; resume from the last checkpoint with: colearn resume RUN"
    ]


def test_a_later_worse_offspring_is_not_deployed(tmp_path):
    assert deploys({"Lake": 0.0, "MirrorLake": 0.0}, 0, tmp_path)  # nothing deployed yet: the first offspring is
    (tmp_path / "deployed.json").write_text(json.dumps({"generation": 1, "scores": {"Lake": 1.0, "MirrorLake": 0.5}}))
    assert not deploys({"Lake": 1.0, "MirrorLake": 0.0}, 2, tmp_path)  # mean 0.5 < 0.75
    assert deploys({"Lake": 0.5, "MirrorLake": 1.0}, 2, tmp_path)  # a tie deploys the newer one
    assert deploys({"Lake": 0.0, "MirrorLake": 0.0}, 1, tmp_path)  # a resume replaying generation 1 ignores its pointer
