"""The `colearn` console script: `colearn <subcommand> ...` runs a subcommand, anything else is an experiment.

    colearn [hydra overrides]                 run an experiment (colearn.cli.experiment)
    colearn resume RUN_DIR [--restart]        continue a run from its newest intact checkpoint
    colearn export RUN_DIR OUT                a deployable Hugging Face directory with a model card
    colearn report RUN_DIR                    RUN_DIR/report.html
    colearn compare SWEEP_DIR                 SWEEP_DIR/compare.html: the presets of a sweep side by side
    colearn merge --base B --recipe R --out O A B ...   merge checkpoints on disk (or a mergekit recipe)

Each command's module is imported only when it runs (`COMMANDS`), so `colearn merge` starts without the training
stack (transformers, gymnasium, datasets, Hydra).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from colearn.cli.console import user_errors

# subcommand -> "module:function" taking the remaining argv
SUBCOMMANDS: dict[str, str] = {
    "merge": "colearn.cli.merge:main",
    "report": "colearn.cli.report:report_main",
    "compare": "colearn.cli.report:compare_main",
    "resume": "colearn.cli.resume:main",
    "export": "colearn.cli.export:main",
}
EXPERIMENT = "colearn.cli.experiment:hydra_entry"  # the rest of the command line is Hydra's


def command(target: str) -> Callable:
    """Returns the function `target` ("module:function") names, importing its module."""
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def subcommand(name: str) -> Callable[[list[str]], None]:
    """Returns the function implementing `colearn <name>`."""
    return command(SUBCOMMANDS[name])


def main() -> None:
    """Entry point of the `colearn` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name in SUBCOMMANDS:
        with user_errors():
            subcommand(name)(sys.argv[2:])
        return
    command(EXPERIMENT)()
