"""What a run directory keeps of its generations: deployed.json (the offspring a deployment uses), pruning of old
generation checkpoints, and the atomic JSON writes both rely on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from colearn.experience.evaluate import mean_over_envs


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON so that a crash leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def prune_generations(run_dir: Path, keep: int) -> None:
    """Deletes generation checkpoints beyond the newest `keep` (never the deployed one, though its optimizer
    state goes), so a long run's directory grows only by its experience and logs."""
    if keep <= 0:
        return
    deployed = run_dir / "deployed.json"
    protected = json.loads(deployed.read_text(encoding="utf-8"))["path"].split("/")[1] if deployed.exists() else None
    generations = sorted(d for d in (run_dir / "checkpoints").glob("gen_*") if not d.name.endswith(".tmp"))
    for d in generations[:-keep]:
        if d.name != protected:
            shutil.rmtree(d, ignore_errors=True)
        for optimizer_state in d.glob("*/optimizer.pt"):
            optimizer_state.unlink(missing_ok=True)


def deploys(scores: dict[str, float], generation: int, run_dir: Path) -> bool:
    """Returns whether generation `generation`'s offspring, with these normalized scores (env -> score, the
    reported evaluation), replaces the run's deployed one: when none is deployed yet, or when its mean over envs
    is at least the deployed one's. So a long run keeps the best offspring it has made (a merge the gate passed,
    or the fallback it took instead) and never deploys a later, worse one. A pointer to this generation or a later
    one was left by the run a resume replays: it is not compared against."""
    path = run_dir / "deployed.json"
    if not path.exists():
        return True
    deployed = json.loads(path.read_text(encoding="utf-8"))
    return deployed["generation"] >= generation or mean_over_envs(scores) >= mean_over_envs(deployed["scores"])
