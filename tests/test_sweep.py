"""Tests of a sweep's run directories: short shell-safe subdirectory names holding only the swept values, found
and labelled by `colearn compare` from each run's own overrides; and `experience.load` on a real run."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from colearn.cli.experiment import name_sweep_runs_by_swept_keys, sweep_subdir
from colearn.cli.main import subcommand
from colearn.experience import store as experience
from tests.conftest import CLI_TINY

SHELL_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def test_only_the_fixed_overrides_are_excluded_from_the_names():
    argv = [
        "-m",
        "experiment=full,independent",
        "loop.generations=1",
        "+extra=[1,2]",
        "seed=range(0,3)",
        "hydra.sweep.dir=out",
        "hydra/launcher=joblib",
    ]
    assert name_sweep_runs_by_swept_keys(argv) == [
        *argv,
        "hydra.job.config.override_dirname.exclude_keys=['loop.generations','extra']",
    ]
    assert name_sweep_runs_by_swept_keys(argv[1:]) == argv[1:]  # one run: no sweep subdirectories
    own = ["-m", "seed=0,1", "loop.rounds=1", "hydra.job.config.override_dirname.exclude_keys=[seed]"]
    assert name_sweep_runs_by_swept_keys(own) == own


@pytest.mark.parametrize(
    "dirname, name",
    [
        ("experiment-independent_seed-1", "3_experiment-independent_seed-1"),
        ("integrate.modes-[route,ensemble]", "3_integrate.modes-route-ensemble"),
        ("integrate.modes-[]", "3_integrate.modes"),
        ("model.source-/data/my model's dir_+extra-{a: 1}", "3_model.source--data-my-models-dir_+extra-a-1"),
        ("", "3"),
        ("merge.weights-" + ",".join(["0.125"] * 40), ("3_merge.weights-" + "-".join(["0.125"] * 40))[:80]),
    ],
)
def test_sweep_subdir_names_are_short_and_shell_safe(dirname, name):
    assert sweep_subdir(3, dirname) == name
    assert SHELL_SAFE.fullmatch(name) and len(name) <= 80


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 2-run sweep over a list-valued key, with the fixed tiny overrides on the same command line."""
    root = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "colearn.cli",
            "-m",
            f"hydra.sweep.dir={root / 'sweep'}",
            *CLI_TINY,
            "integrate.modes=[],[route]",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return root / "sweep"


def test_a_sweep_names_its_runs_by_the_swept_values_and_compare_labels_them(sweep, capsys):
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0_integrate.modes", "1_integrate.modes-route"]
    assert yaml.safe_load((sweep / runs[1] / ".hydra" / "overrides.yaml").read_text())[-1] == "integrate.modes=[route]"
    subcommand("compare")([str(sweep)])
    table = capsys.readouterr().out.split("final offspring")[1].split("final partners")[0]
    labels = [line.split("  ")[0] for line in table.splitlines() if line.startswith("integrate.modes=")]
    assert labels == ["integrate.modes=[]", "integrate.modes=[route]"]


def test_experience_load_returns_every_step_of_a_run(sweep):
    run = sweep / "0_integrate.modes"
    rows = experience.load(run)
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    pairs = sum(len(p["envs"]) for p in config["env"]["partners"])
    # one round: each partner played rollout.episodes=8 episodes in each of its envs, every step a row
    assert len({r for r in rows["episode_id"]}) == 8 * pairs
    assert sum(rows["done"]) == 8 * pairs and set(rows["partner"]) == {p["name"] for p in config["env"]["partners"]}
    assert len(rows) == sum(
        len(experience.ExperienceStore(run / "experience").select(partner=p["name"])) for p in config["env"]["partners"]
    )
