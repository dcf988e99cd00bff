"""Tests of the `colearn` command, run as a real subprocess: a tiny end-to-end run, --cfg/--help,
and user mistakes (one `colearn: error:` line, non-zero exit, no traceback, no run dir left behind).

Every command is started when collection ends (see conftest.py: they are mostly import time, so they
overlap with the in-process tests); the `cli_runs` fixture waits for them.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

# the cases of conftest.CLI_BAD, and what each one's error line must name
BAD = {
    "unknown_env": "colearn/Nope-v0",
    "missing_model_dir": "model.source",
    "negative_lr": "learn.lr",
    "bogus_mode": "rollout.mode",
    "unknown_merge": "choose one of: breadcrumbs,",  # a Hydra option: one line naming the valid ones
    # a value outside a closed set: rejected at composition, before a model is built or a generation is played
    # (a run that got that far would leave metrics and checkpoints in its run dir)
    "unknown_merge_method": "merge.method: 'tie' is not one of linear, task_arithmetic,",
    "unknown_integrate_mode": "integrate.modes: 'vote' is not one of route, route_confidence,",
}


def test_tiny_run_writes_a_complete_run_directory(cli_runs):
    code, out, err, run_dir = cli_runs["run"]
    assert code == 0, err
    assert "Traceback" not in err
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["loop"]["rounds"] == 1 and config["model"]["hidden_size"] == 32
    envs = [e["name"] for e in config["env"]["suite"]]
    partners = [p["name"] for p in config["env"]["partners"]]
    assert len(envs) >= 1 and len(partners) >= 1

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(e["partner"], e["env"]) for e in events if e["event"] == "eval"}
    assert {(p, e) for p in [*partners, "offspring"] for e in envs} <= evals
    assert {"learn", "merge"} <= {e["event"] for e in events}

    shard = run_dir / "experience" / "shard_000000"
    assert shard.is_dir()
    assert len(list((run_dir / "experience").glob("shard_*"))) == len(partners)
    from colearn.experience.store import ExperienceStore

    rows = ExperienceStore(run_dir / "experience").select()
    # each partner played rollout.episodes=8 episodes in each of its envs
    assert len({r["episode_id"] for r in rows}) == 8 * sum(len(p["envs"]) for p in config["env"]["partners"])
    assert {r["run_id"] for r in rows} == {"run"}

    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert isinstance(lineage, list) and lineage and lineage[0]["generation"] == 0
    assert sorted(lineage[0]["parents"]) == sorted(f"gen0/{p}" for p in partners)
    ckpt = run_dir / "checkpoints" / "gen_0000"
    assert {*partners, "ancestor"} <= {p.name for p in ckpt.iterdir()}

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("policy"))
    assert all(e in lines[header] for e in envs)
    table_rows = [line.split()[0] for line in lines[header + 2 :] if line and not line.startswith("run directory")]
    assert table_rows[-1] == "optimal"
    assert {*partners, "offspring"} <= set(table_rows)
    assert f"run directory: {run_dir}" in out


def test_cfg_job_prints_the_config(cli_runs):
    code, out, err, run_dir = cli_runs["cfg_job"]
    assert code == 0, err
    assert "rollout:" in out and "model:" in out and "learn:" in out
    config = yaml.safe_load(out)
    assert config["rollout"]["group_size"] >= 1
    assert not run_dir.exists()  # nothing was run


def test_help_exits_zero(cli_runs):
    code, out, err, _ = cli_runs["help"]
    assert code == 0, err
    assert "Configuration groups" in out or "override" in out.lower()
    assert "model" in out and "env" in out


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line(cli_runs, case):
    code, out, err, run_dir = cli_runs[case]
    field = BAD[case]
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("colearn: error:")
    assert field in lines[0]
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] in ([], [".hydra"])


def test_type_mismatch_names_the_field(cli_runs):
    code, out, err, run_dir = cli_runs["rounds_abc"]
    assert code != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith("colearn: error:"), err
    assert "loop.rounds" in err
    assert "Traceback" not in err
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] in ([], [".hydra"])


# --- the same checks in-process: bad values must be rejected before the run starts -------------------
# (to_config runs each section's checks, validate the ones needing the outside world; a value that gets
# past both fails later inside loop.run with a traceback and a half-written run dir)


def checked_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from colearn.cli.experiment import CONF_DIR, register_configs, to_config, validate

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    validate(cfg)
    return cfg


def test_default_config_passes_the_checks():
    cfg = checked_config([])
    assert cfg.rollout.episodes % cfg.rollout.group_size == 0


REJECTED = [
    pytest.param(["env=lake", "env.suite=[{id: colearn/Nope-v0, name: Lake}]"], "colearn/Nope-v0", id="unknown_env"),
    pytest.param(["model.source=/nonexistent"], "model.source", id="missing_model_dir"),
    pytest.param(["learn.lr=-1"], "learn.lr", id="negative_lr"),
    pytest.param(["rollout.mode=bogus"], "rollout.mode", id="bogus_mode"),
    pytest.param(["env=addition", "rollout.mode=constrained"], "rollout.mode", id="constrained_without_names"),
    pytest.param(["rollout.episodes=10", "rollout.group_size=4"], "rollout.group_size", id="episodes_not_groups"),
    pytest.param(["env.partners=[{name: A, envs: [Nowhere]}]"], "Nowhere", id="partner_env_not_in_suite"),
    pytest.param(["loop.rounds=0"], "loop.rounds", id="zero_rounds"),
    pytest.param(["eval.episodes=0"], "eval.episodes", id="zero_eval_episodes"),
    pytest.param(["env=addition", "rollout.max_new_tokens=0"], "rollout.max_new_tokens", id="zero_new_tokens"),
    pytest.param(["model.hidden_size=32", "model.num_heads=3"], "model.num_heads", id="heads_do_not_divide"),
    pytest.param(["rollout.gamma=-3"], "rollout.gamma", id="negative_gamma"),
    pytest.param(["merge.weights=[1.0,1.0,1.0]"], "merge.weights", id="a_weight_per_partner"),
    pytest.param(["merge=ties", "+merge.params.gama=0.1"], "merge.params.gama", id="unknown_merge_param"),
    pytest.param(
        ["merge=evolve", "merge.base_method=slerp", "+merge.params.epsilon=0.1"],
        "merge.params.epsilon",
        id="unknown_param_of_the_searched_operator",
    ),
    pytest.param(["+merge.groups={block*: {densty: 0.5}}"], "densty", id="unknown_group_override"),
    pytest.param(
        ["device=cuda"],
        "device",
        id="cuda_missing",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
    ),
]


@pytest.mark.parametrize("overrides,field", REJECTED)
def test_bad_values_are_rejected_before_the_run(overrides, field):
    from colearn.errors import ColearnError

    with pytest.raises(ColearnError, match=field.replace(".", r"\.")):
        checked_config(overrides)


def test_a_bad_env_argument_stops_the_run_with_one_line_naming_it(capsys):
    # envs raise EnvConfigError, not ColearnError: the CLI must still print it as the user's mistake
    from colearn.cli.console import user_errors

    overrides = ["env=addition", "env.suite=[{id: colearn/Addition-v0, name: Addition1, kwargs: {digits: 0}}]"]
    with pytest.raises(SystemExit) as stop, user_errors():
        checked_config(overrides)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "colearn: error: env.digits must be an int >= 1, got 0\n"
