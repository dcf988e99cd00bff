"""Metrics: one JSON object per event in metrics.jsonl; its namespaced scalars also in TensorBoard.

TensorBoard gets only numeric fields whose name is namespaced (`return/greedy/A/Lake`, `merge/gain`): each
names one series (one policy, partner, env), so a tag has one point per step. Flat fields (`generation`,
`mean_return`, `env`) describe the event in metrics.jsonl and would mix every series under one tag.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


class Logger:
    """Appends events to `run_dir/metrics.jsonl` (flushed per event, made durable by `sync`) and `run_dir/tb/`."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.lines = len(self.path.read_text(encoding="utf-8").splitlines()) if self.path.exists() else 0
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, TensorBoard drops its events past the checkpoint instead of doubling them
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step or None)

    def write(self, event: str, step: int, **fields: Any) -> dict[str, Any]:
        """Writes one event; its numeric namespaced fields (see `tensorboard_scalars`) also go to TensorBoard."""
        record = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self.lines += 1
        self._file.flush()
        if self._tb is not None:
            for key, value in tensorboard_scalars(fields).items():
                self._tb.add_scalar(key, value, step)
        return record

    def sync(self) -> None:
        """Makes every event written so far durable (the loop calls it before each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def tensorboard_scalars(fields: dict[str, Any]) -> dict[str, float]:
    """Returns the fields of an event that TensorBoard gets: finite numbers whose key is namespaced."""
    return {
        key: value
        for key, value in fields.items()
        if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return str(value)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Returns the events of a run's metrics.jsonl (a torn last line from a crash is skipped)."""
    events = []
    for line in Path(run_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def truncate_metrics(run_dir: str | Path, lines: int) -> None:
    """Cuts metrics.jsonl back to its first `lines` events (those a checkpoint had seen), atomically."""
    path = Path(run_dir, "metrics.jsonl")
    if not path.exists():
        return
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
