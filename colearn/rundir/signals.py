"""Stopping a run at a safe point: SIGINT and SIGTERM ask the loop to stop after its next checkpoint."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StopOnSignal:
    """Within its block, SIGINT and SIGTERM ask the loop to stop at the next round boundary (after its
    checkpoint) instead of killing it mid-write; a second signal stops at once, saying how to resume."""

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            where = f" with: colearn resume {self.run_dir}" if self.run_dir else ""
            print(
                f"colearn: stopped at once by a second {signal.Signals(signum).name}; resume from the last "
                f"checkpoint{where}",
                file=sys.stderr,
                flush=True,
            )
            # SystemExit, not KeyboardInterrupt: no traceback, and `with` blocks (the run lock) still unwind
            raise SystemExit(128 + signum)
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after the current round's checkpoint", self.requested)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
