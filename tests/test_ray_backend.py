"""backend=ray: one Ray actor per partner gives, on CPU, the metrics and weights of the local backend, and a stopped
run resumes from its checkpoint (new actors loaded with the restored partners) to the uninterrupted result.

One Ray session serves the module (starting one takes seconds); the backend uses it as it is and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colearn import loop
from colearn.backends.ray import RayBackend
from colearn.config import Config, EnvConfig, EnvSpec, EvalConfig, LearnConfig, LoopConfig, PartnerSpec, RolloutConfig
from colearn.errors import ColearnError
from tests.conftest import LAKE_ID, tiny_model_config

ray = pytest.importorskip("ray")


def tiny_config(backend: str) -> Config:
    """Two partners in two maps, 2 generations of 2 rounds (a merge, then the offspring's copies in the actors),
    with mutual learning on, so a lesson carries its teacher to the actor too."""
    suite = [EnvSpec(LAKE_ID, "Lake"), EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]})]
    return Config(
        model=tiny_model_config(),
        env=EnvConfig(suite=suite, partners=[PartnerSpec("A", ["Lake"]), PartnerSpec("B", ["Line"])]),
        loop=LoopConfig(generations=2, rounds=2),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        learn=LearnConfig(mutual_kl_coef=0.1),
        eval=EvalConfig(episodes=1),
        run_id="run",  # the step records name the run alike in every directory
        progress=False,
        backend=backend,
    )


def events(run_dir: Path) -> list[dict]:
    """The run's metrics without wall-clock times."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every generation directory and the newest round checkpoint: weights, value heads, and the
    partners' optimizer state, by file and name."""
    found = {}
    newest = max((run_dir / "checkpoints").glob("round_g*"))
    for directory in [*sorted((run_dir / "checkpoints").glob("gen_*")), newest]:
        for f in sorted(directory.rglob("*.safetensors")):
            found |= {f"{f.relative_to(directory.parent)}:{k}": v for k, v in load_file(f).items()}
        for f in sorted(directory.rglob("optimizer.pt")):
            state = torch.load(f, weights_only=True)["state"]
            found |= {f"{f.relative_to(directory.parent)}:{i}.{k}": v for i, s in state.items() for k, v in s.items()}
    return found


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    loop.run(tiny_config("local"), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def ray_run(ray_session, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ray") / "run"
    loop.run(tiny_config("ray"), run_dir)
    return run_dir


def test_ray_run_equals_the_local_one(local_run, ray_run):
    assert ray.is_initialized()  # the backend left the session it found running
    assert any(e["event"] == "merge" and e["outcome"] == "merged" for e in events(local_run))  # a merge happened
    assert events(ray_run) == events(local_run)
    expected, got = tensors(local_run), tensors(ray_run)
    assert any(".optimizer.pt" not in k and "/offspring/" in k for k in expected)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(got[k], expected[k])
    ]


def test_a_stopped_ray_run_resumes_to_the_uninterrupted_result(ray_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    save = loop.checkpoint

    def stop_after_first(state, ctx):  # SIGTERM once generation 0's first round is checkpointed, as a user would
        save(state, ctx)
        if (state.generation, state.round) == (0, 1):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "checkpoint", stop_after_first)
    stopped = loop.run(tiny_config("ray"), run_dir)
    assert (stopped.stopped_by, stopped.generation, stopped.round) == ("SIGTERM", 0, 1)
    monkeypatch.setattr(loop, "checkpoint", save)
    resumed = loop.run(tiny_config("ray"), run_dir)  # from round_g0000_r001: new actors, the partners restored
    assert resumed.stopped_by is None and resumed.generation == 2
    assert events(run_dir) == events(ray_run)
    expected, got = tensors(ray_run), tensors(run_dir)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_more_actors_than_the_cluster_has_room_for_stop_with_one_line(ray_session):
    cfg = tiny_config("ray")
    cfg.env.partners.append(PartnerSpec("C", ["Lake"]))
    with pytest.raises(ColearnError, match=r"ray.num_cpus=1.0 for 3 partners needs 3 CPUs; the Ray cluster has 2: "):
        RayBackend(cfg)
    assert ray.is_initialized()  # the session it found goes on
