"""Crash-safe checkpoints of the loop state at round boundaries.

A checkpoint directory is written aside (`*.tmp`), fsynced, then renamed into place, so a crash
leaves either the previous checkpoint or the new one. MANIFEST.json holds a SHA-256 per file;
loading verifies it and falls back to the newest checkpoint that is intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from colearn.config import Config
from colearn.errors import ColearnError
from colearn.evaluate import EnvScore
from colearn.partner import Partner

log = logging.getLogger(__name__)
KEEP = 2  # round checkpoints kept besides the newest generation ones


def checkpoint_name(generation: int, round_: int) -> str:
    return f"round_g{generation:04d}_r{round_:03d}"


def file_digest(path: Path) -> str:
    """Returns the SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(root: Path, state: Any, extra: dict[str, Any]) -> Path:
    """Writes the loop state (partners with optimizers, ancestor, position, scores) and `extra`
    (e.g. the experience store's shard count and metrics line count) as one checkpoint; returns its path."""
    final = root / checkpoint_name(state.generation, state.round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in state.partners:
        p.save(tmp / "partners" / p.name)
    state.ancestor.save(tmp / "ancestor")
    meta = {
        "generation": state.generation, "round": state.round, "env_steps": state.env_steps,
        "partners": [{"name": p.name, "envs": p.envs} for p in state.partners],
        "lineage": state.lineage,
        "score_history": state.score_history,
        "last_scores": {k: [asdict(s) for s in v] for k, v in state.last_scores.items()},
        "torch_rng": torch.get_rng_state().tolist(),
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): file_digest(p) for p in files}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(root)
    return final


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _prune(root: Path) -> None:
    # the newest KEEP round checkpoints stay; older ones are superseded
    rounds = sorted(d for d in root.glob("round_g*") if d.is_dir() and not d.name.endswith(".tmp"))
    for d in rounds[:-KEEP]:
        shutil.rmtree(d, ignore_errors=True)


def is_intact(path: Path) -> bool:
    """Returns True when every file in the checkpoint's manifest is present with its recorded digest."""
    manifest_path = path / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return all((path / rel).is_file() and file_digest(path / rel) == digest for rel, digest in manifest.items())


def latest_intact(root: Path) -> Path | None:
    """Returns the newest intact round checkpoint under `root`, logging each damaged one it skips."""
    for d in sorted((d for d in root.glob("round_g*") if d.is_dir() and not d.name.endswith(".tmp")),
                    reverse=True):
        if is_intact(d):
            return d
        log.warning("checkpoint %s is damaged (checksum mismatch or missing file); trying an older one", d)
        print(f"colearn: checkpoint {d.name} is damaged; falling back to an older one")
    return None


def load_checkpoint(path: Path, cfg: Config) -> tuple[dict[str, Any], list[Partner], Partner]:
    """Returns (state metadata, partners with optimizer state, ancestor) stored at `path`."""
    from colearn.learn import optimizer_for
    from colearn.models import resolve_device

    if not is_intact(path):
        raise ColearnError(f"checkpoint {str(path)!r} is damaged; delete it to resume from an older one")
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    device = resolve_device(cfg.device)
    partners = []
    for spec in meta["partners"]:
        d = path / "partners" / spec["name"]
        p = Partner.load(d, spec["name"], cfg.model, device)
        p.envs = list(spec["envs"])
        if (d / "optimizer.pt").exists():
            optimizer_for(p, cfg.learn).load_state_dict(torch.load(d / "optimizer.pt", map_location=device))
        partners.append(p)
    ancestor = Partner.load(path / "ancestor", "ancestor", cfg.model, device)
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    meta["last_scores"] = {k: [EnvScore(**s) for s in v] for k, v in meta["last_scores"].items()}
    return meta, partners, ancestor
