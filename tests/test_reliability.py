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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colearn import loop
from colearn.config import Config, MergeConfig
from colearn.errors import ColearnError
from colearn.experience import ExperienceStore
from colearn.runlock import RunLock
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
    return dataclasses.replace(cfg, merge=MergeConfig(method=merge),
                               loop=dataclasses.replace(cfg.loop, keep_generations=keep_generations))


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


# --- run_id, signals ----------------------------------------------------------------------------------------


def test_resume_from_inside_the_run_dir_keeps_its_name_as_run_id(tmp_path, monkeypatch):
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    loop.run(tiny_config(generations=1, rounds=1), Path("."))
    assert {r["run_id"] for r in ExperienceStore(run_dir / "experience").table().to_pylist()} == {"myrun"}


