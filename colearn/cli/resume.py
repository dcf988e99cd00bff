"""`colearn resume RUN_DIR [--restart]`: continue a run from its newest intact checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from colearn import loop
from colearn.cli.console import logs_above_bars, quiet_libraries
from colearn.cli.experiment import report_end, to_config
from colearn.config import Config
from colearn.errors import ColearnError


def run_config(run_dir: Path) -> Config:
    """Returns the typed Config a run was started with (its .hydra/config.yaml)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ColearnError(f"{str(run_dir)!r} has no .hydra/config.yaml; give a colearn run directory")
    return to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="colearn resume", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="when no round or generation checkpoint is intact, discard the run's metrics and "
        "experience and start over (without it, such a resume stops and deletes nothing)",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    cfg = run_config(args.run_dir)
    with logs_above_bars():
        state = loop.run(cfg, args.run_dir, restart=args.restart)
    report_end(state, args.run_dir)
