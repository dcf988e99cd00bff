"""`colearn [hydra overrides]`: the Hydra main that composes conf/ into a typed Config and runs an experiment.

    colearn [hydra overrides]        run an experiment (e.g. colearn experiment=independent seed=1)
    colearn -m seed=0,1,2            a sweep: one run directory per job, named by what the sweep varies
    colearn --cfg job                print the composed config; colearn --help for Hydra's help

The only module that knows Hydra: the rest of colearn takes the dataclasses of `colearn.config`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf

from colearn import loop
from colearn.analysis.summary import summary_table
from colearn.breeding.offspring import merge_recipe
from colearn.cli.console import logs_above_bars, quiet_libraries, user_errors
from colearn.config import Config
from colearn.experience.rollout import acting_mode
from colearn.merging.evolve import start_recipe
from colearn.models.build import load_pretrained, resolve_device
from colearn.rundir.runlock import holder, in_use_message

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def to_config(dcfg) -> Config:
    """Returns the typed Config from Hydra's composed DictConfig (runs each section's checks)."""
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, Config)
    return cfg


def validate(cfg) -> None:
    """Raises ColearnError for any input the run would otherwise trip over later: env ids (pretraining's too),
    model dir, and the merge recipe for this many partners (merge.weights, merge.params and merge.groups, which the
    first merge would check only after a generation)."""
    resolve_device(cfg.device)
    for spec in [*cfg.env.suite, *cfg.pretrain.suite]:
        acting_mode(spec, cfg.rollout.mode)
    n_partners = len(cfg.env.partners)
    if cfg.merge.method != "none" and n_partners > 1:
        (start_recipe if cfg.merge.method == "evolve" else merge_recipe)(cfg.merge, n_partners)
    if cfg.model.source != "tiny":
        load_pretrained(cfg.model.source, cfg.model.dtype)


def report_end(state: loop.LoopState, run_dir: Path) -> None:
    """Prints how the run ended: the summary table, or how to continue a run stopped by a signal."""
    if state.stopped_by:
        print(
            f"colearn: stopped by {state.stopped_by} at generation {state.generation} round {state.round}; "
            f"continue with: colearn resume {run_dir}"
        )
        return
    print(summary_table(state.last_scores))
    print(f"run directory: {run_dir}")


def run_experiment(dcfg) -> None:
    """Runs one experiment in Hydra's run directory and prints the summary table."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(run_dir):
        cfg = to_config(dcfg)
        validate(cfg)
        with logs_above_bars():
            state = loop.run(cfg, run_dir)
    report_end(state, run_dir)


def refuse_occupied_run_dir(argv: list[str]) -> None:
    """Stops with one line when `hydra.run.dir=DIR` names a directory another run holds: checked before Hydra
    starts, because Hydra rewrites DIR/.hydra/config.yaml before the run's own lock is taken."""
    if any(a in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i") for a in argv):
        return  # Hydra only prints: nothing is written into the directory
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        pid = holder(Path(value)) if key == "hydra.run.dir" and value else None
        if pid is not None:
            print(f"colearn: error: {in_use_message(Path(value), pid)}", file=sys.stderr)
            sys.exit(2)


def register_configs() -> None:
    """Registers the schema (colearn.config.Config) so Hydra type-checks conf/ YAML against it."""
    # conf/config.yaml lists it first: every group's YAML is checked against it
    ConfigStore.instance().store(name="schema", node=Config)


def hydra_entry() -> None:
    """Runs Hydra's main: one experiment, or with -m a sweep; a bad override or option stops with one line."""
    quiet_libraries()
    refuse_occupied_run_dir(sys.argv[1:])
    sys.argv[1:] = name_sweep_runs_by_swept_keys(sys.argv[1:])
    register_configs()
    wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them in many lines
    try:
        hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")(run_experiment)()
    except CompactHydraException as e:  # a bad override or config option: the user's to fix
        if wants_traces:
            raise
        print(f"colearn: error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def hydra_error_line(error: Exception) -> str:
    """Returns one line for a Hydra composition error: the option asked for and the valid ones, or the override
    and why its value does not fit."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not an option; choose one of: {', '.join(sorted(error.options))}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = str(error.__cause__).strip().splitlines() if error.__cause__ is not None else []
    return f"{first.rstrip('.')}: {cause[0]}" if cause else first


MULTIRUN_FLAGS = ("-m", "--multirun", "hydra.mode=MULTIRUN")
SWEEP_SUBDIR_LENGTH = 80  # characters of a run's subdirectory name, at most


def name_sweep_runs_by_swept_keys(argv: list[str]) -> list[str]:
    """Returns `argv`, in a multirun that fixes some overrides (`colearn -m seed=0,1 loop.generations=1`) with
    `hydra.job.config.override_dirname.exclude_keys` set to their keys, so each run's subdirectory names only
    what the sweep varies (`sweep_subdir`); `argv` as it is otherwise, or when it sets exclude_keys itself.
    Hydra hands this override to every job, whichever launcher runs it (joblib's in other processes too)."""
    if not any(a in MULTIRUN_FLAGS for a in argv) or any("override_dirname.exclude_keys" in a for a in argv):
        return argv
    parser = OverridesParser.create()
    fixed = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException:
            continue  # Hydra reports it when it parses the command line itself
        if not override.is_sweep_override() and not override.is_hydra_override():
            fixed.append(override.key_or_group)
    if not fixed:
        return argv
    keys = ",".join(f"'{key}'" for key in dict.fromkeys(fixed))
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


def sweep_subdir(num: int, override_dirname: str) -> str:
    """Returns a multirun job's subdirectory name (conf/config.yaml's hydra.sweep.subdir): its number, then
    Hydra's override_dirname (`key-value` of each swept override, joined by `_`), shell-safe: brackets, braces
    and quotes dropped, any other run of characters but letters, digits and `._+-` made one `-`, at most
    SWEEP_SUBDIR_LENGTH characters. `3_experiment-independent_seed-1`, `1_integrate.modes-route-ensemble`.
    Only a person reads it: `colearn compare` takes each run's overrides from its .hydra/overrides.yaml."""
    kept = re.sub(r"[\[\]{}()'\"]", "", str(override_dirname))
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", kept)
    return f"{num}_{safe}"[:SWEEP_SUBDIR_LENGTH].rstrip("_-.") if safe else str(num)


def register_resolvers() -> None:
    """Registers the OmegaConf resolver conf/config.yaml names: `colearn_sweep_subdir` (`sweep_subdir`)."""
    OmegaConf.register_new_resolver("colearn_sweep_subdir", sweep_subdir, replace=True)


# at import: a launcher's worker process (joblib) resolves the run's subdirectory before it calls the task, and
# it imports this module to unpickle the task, never calling hydra_entry
register_resolvers()
