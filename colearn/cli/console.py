"""What the `colearn` commands show on the console: a user's mistake as one line (exit code 2), log records and
warnings above the progress bars, and the libraries' own progress bars silenced.

Light (no torch, no transformers): `colearn merge` runs inside `user_errors` too.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from colearn.errors import ColearnError
from colearn.rundir.runlock import LOCK_FILE, holder


@contextmanager
def logs_above_bars() -> Iterator[None]:
    """Within the block, log records and Python warnings print on lines of their own above the progress bars
    (through `tqdm.write`) instead of onto a bar's line; with no logging configured (no Hydra: `colearn
    resume`), warnings get a console handler to print through."""
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
