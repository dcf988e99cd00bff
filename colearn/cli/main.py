"""The `colearn` command: a Hydra main for experiments, plus subcommands for finished runs.

    colearn [hydra overrides]        run an experiment (e.g. colearn experiment=independent seed=1)
    colearn --cfg job                print the composed config; colearn --help for Hydra's help
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from colearn.errors import ColearnError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def to_config(dcfg) -> "Config":  # noqa: F821 - imported lazily so `colearn --help` stays fast
    """Returns the typed Config from Hydra's composed DictConfig (runs each section's checks)."""
    from omegaconf import OmegaConf

    from colearn.config import Config

    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, Config)
    return cfg


def validate(cfg) -> None:
    """Raises ColearnError for any input the run would otherwise trip over later: env ids, model dir, and the
    merge recipe for this many partners (merge.weights, merge.params and merge.groups, which the first merge
    would check only after a generation)."""
    from colearn.merging.evolve import start_recipe
    from colearn.models.build import load_pretrained, resolve_device
    from colearn.breeding.offspring import merge_recipe
    from colearn.experience.rollout import acting_mode

    resolve_device(cfg.device)
    for spec in cfg.env.suite:
        acting_mode(spec, cfg.rollout.mode)
    n_partners = len(cfg.env.partners)
    if cfg.merge.method != "none" and n_partners > 1:
        (start_recipe if cfg.merge.method == "evolve" else merge_recipe)(cfg.merge, n_partners)
    if cfg.model.source != "tiny":
        load_pretrained(cfg.model.source, cfg.model.dtype)


def run_experiment(dcfg) -> None:
    """Runs one experiment in Hydra's run directory and prints the summary table."""
    from hydra.core.hydra_config import HydraConfig

    from colearn import loop
    from colearn.analysis.summary import summary_table

    from colearn.cli.resume import report_end

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(run_dir):
        cfg = to_config(dcfg)
        validate(cfg)
        with logs_above_bars():
            state = loop.run(cfg, run_dir)
    report_end(state, run_dir, summary_table)


@contextmanager
def logs_above_bars() -> Iterator[None]:
    """Within the block, log records and Python warnings print on lines of their own above the progress bars
    (through `tqdm.write`) instead of onto a bar's line; with no logging configured (no Hydra: `colearn
    resume`), warnings get a console handler to print through."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    console = None
    if not root.handlers:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
        root.addHandler(console)
    logging.captureWarnings(True)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        logging.captureWarnings(False)
        if console is not None:
            root.removeHandler(console)


def is_user_error(error: BaseException) -> bool:
    """Returns whether `error` is the user's to fix: a ColearnError, or an EnvConfigError of the envs package (looked
    up only where that package is loaded: no other code raises it, and a command without envs need not import it)."""
    env_errors = sys.modules.get("envs.errors")
    return isinstance(error, ColearnError) or (env_errors is not None and isinstance(error, env_errors.EnvConfigError))


class user_errors:
    """Turns a ColearnError into one line on stderr and exit code 2; a run dir the run never got to
    write into (only Hydra's own files) is removed, so nothing half-written stays behind."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or not is_user_error(error):
            return False
        print(f"colearn: error: {error}", file=sys.stderr)
        if self.run_dir is not None and self.run_dir.is_dir():
            self._remove_if_unused(self.run_dir)
        sys.exit(2)

    @staticmethod
    def _remove_if_unused(run_dir: Path) -> None:
        from colearn.rundir.runlock import LOCK_FILE, holder

        ours = [p for p in run_dir.iterdir() if p.name not in (".hydra", LOCK_FILE) and not p.name.endswith(".log")]
        # a directory another process holds is its run, however little it has written yet
        if not ours and holder(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)


def quiet_libraries() -> None:
    """Silences the progress bars datasets and transformers draw for every shard and checkpoint write."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def refuse_occupied_run_dir(argv: list[str]) -> None:
    """Stops with one line when `hydra.run.dir=DIR` names a directory another run holds: checked before Hydra
    starts, because Hydra rewrites DIR/.hydra/config.yaml before the run's own lock is taken."""
    from colearn.rundir.runlock import holder, in_use_message

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
    from hydra.core.config_store import ConfigStore

    from colearn.config import Config

    # conf/config.yaml lists it first: every group's YAML is checked against it
    ConfigStore.instance().store(name="schema", node=Config)


def hydra_entry() -> None:
    import hydra
    from hydra.errors import CompactHydraException

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
    from hydra.errors import MissingConfigException

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
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

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
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("colearn_sweep_subdir", sweep_subdir, replace=True)


# at import: a launcher's worker process (joblib) resolves the run's subdirectory before it calls the task, and
# it imports this module to unpickle the task, never calling hydra_entry
register_resolvers()


# subcommand -> "module:function" taking the remaining argv; imported only when used
SUBCOMMANDS: dict[str, str] = {
    "merge": "colearn.cli.merge:main",
    "report": "colearn.analysis.report:main",
    "compare": "colearn.analysis.report:compare_main",
    "resume": "colearn.cli.resume:main",
    "export": "colearn.cli.export:main",
}
# subcommands that never load the training stack (transformers, datasets): `quiet_libraries` would import it
LIGHT_SUBCOMMANDS = frozenset({"merge"})


def subcommand(name: str) -> Callable[[list[str]], None]:
    """Returns the function implementing `colearn <name>`."""
    import importlib

    module, function = SUBCOMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def main() -> None:
    """Entry point of the `colearn` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name not in LIGHT_SUBCOMMANDS:
        quiet_libraries()
    if name in SUBCOMMANDS:
        with user_errors():
            subcommand(name)(sys.argv[2:])
        return
    hydra_entry()


if __name__ == "__main__":
    main()
