"""Shared fixtures: one tiny tokenizer + ancestor built from the envs' text, partners, env specs.

The ancestor is built once per session (it is small: ~14K parameters); tests that change weights
work on copies (`Partner.clone` or `copy.deepcopy`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail at once instead of retrying the Hub

import pytest  # noqa: E402
import torch  # noqa: E402

from colearn.config import EnvSpec, ModelConfig  # noqa: E402

torch.set_num_threads(1)

LAKE_ID = "colearn/FrozenLake-v0"
ADDITION_ID = "colearn/Addition-v0"


def tiny_model_config(**overrides) -> ModelConfig:
    """The smallest model config the tests use (1 layer, hidden 32)."""
    return ModelConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, **overrides})


@pytest.fixture(scope="session")
def lake_spec() -> EnvSpec:
    return EnvSpec(LAKE_ID)


@pytest.fixture(scope="session")
def addition_spec() -> EnvSpec:
    return EnvSpec(ADDITION_ID, kwargs={"digits": 1})


@pytest.fixture(scope="session")
def line_spec() -> EnvSpec:
    """A 1x3 FrozenLake ("SFG"): a random policy reaches the goal within a few steps, so successes happen."""
    return EnvSpec(LAKE_ID, name="Line", kwargs={"desc": ["SFG"]})


@pytest.fixture(scope="session")
def model_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def corpus(lake_spec, addition_spec) -> tuple[list[str], list[str]]:
    """(texts, action names) of the lake and addition envs, as the loop builds its tokenizer from."""
    from colearn.loop import env_corpus

    return env_corpus([lake_spec, addition_spec])


@pytest.fixture(scope="session")
def ancestor(model_cfg, corpus):
    """(model, tokenizer): the tiny ancestor, seed 0, in eval mode. Do not modify it in place."""
    from colearn.models.build import build_ancestor

    texts, names = corpus
    model, tokenizer = build_ancestor(model_cfg, texts, names, seed=0)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer(ancestor):
    return ancestor[1]


@pytest.fixture
def partner(ancestor, model_cfg):
    """A partner over the session's ancestor weights (shared: do not train it; clone it instead)."""
    from colearn.models.partner import Partner

    model, tokenizer = ancestor
    return Partner("A", model, tokenizer, model_cfg, envs=["FrozenLake", "Addition"])


# --- the `colearn` command (tests/test_cli.py) ---------------------------------------------------
# Each command spends most of its time importing torch/transformers/datasets. They are started as soon
# as collection shows test_cli.py will run, so they overlap with the in-process tests (which use one
# thread), and collected by the `cli_runs` fixture.

CLI_TINY = [
    "loop.generations=1",
    "loop.rounds=1",
    "rollout.episodes=8",
    "rollout.group_size=4",
    "rollout.num_envs=8",
    "eval.episodes=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "progress=false",
]

# name -> (overrides, what the one error line must name)
CLI_BAD = {
    "unknown_env": (["env=lake", "env.suite=[{id: colearn/Nope-v0, name: Lake}]"], "colearn/Nope-v0"),
    "missing_model_dir": (["model.source=/nonexistent"], "model.source"),
    "negative_lr": (["learn.lr=-1"], "learn.lr"),
    "bogus_mode": (["rollout.mode=bogus"], "rollout.mode"),
    "unknown_merge": (["merge=foo"], "merge=foo"),
    "unknown_merge_method": (["merge.method=tie"], "merge.method: 'tie' is not one of linear,"),
    "unknown_integrate_mode": (["integrate.modes=[route,vote]"], "integrate.modes: 'vote' is not one of route,"),
}

_cli_jobs: dict = {}


def colearn_command() -> list[str]:
    """The installed console script, or `python -m colearn.cli` when it is not on this venv's bin."""
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("colearn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "colearn.cli"]


def _start_cli_jobs() -> None:
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="colearn-cli-test-"))
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    jobs = {
        "run": [f"hydra.run.dir={root / 'run'}", *CLI_TINY],
        "cfg_job": ["--cfg", "job", f"hydra.run.dir={root / 'cfg_job'}"],
        "help": ["--help"],
        "rounds_abc": [f"hydra.run.dir={root / 'rounds_abc'}", *CLI_TINY, "loop.rounds=abc"],
        **{name: [f"hydra.run.dir={root / name}", *CLI_TINY, *args] for name, (args, _) in CLI_BAD.items()},
    }
    _cli_jobs["root"] = root
    _cli_jobs["procs"] = {
        name: subprocess.Popen(
            colearn_command() + args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in jobs.items()
    }


def pytest_collection_finish(session) -> None:
    if any(item.nodeid.startswith("tests/test_cli.py") or item.path.name == "test_cli.py" for item in session.items):
        _start_cli_jobs()


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil

    for proc in _cli_jobs.get("procs", {}).values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if "root" in _cli_jobs:
        shutil.rmtree(_cli_jobs["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def cli_runs() -> dict:
    """{name: (returncode, stdout, stderr, run dir)} of every command of test_cli.py, once all have ended."""
    if "procs" not in _cli_jobs:
        _start_cli_jobs()
    root = _cli_jobs["root"]
    results = {}
    for name, proc in _cli_jobs["procs"].items():
        out, err = proc.communicate(timeout=900)
        results[name] = (proc.returncode, out, err, root / name)
    return results
