"""Crash-safe checkpoints of the loop state at round boundaries.

A checkpoint directory is written aside (`*.tmp`), fsynced, then renamed into place, so a crash
leaves either the previous checkpoint or the new one. MANIFEST.json holds a SHA-256 per file;
loading verifies it and falls back to the newest checkpoint that is intact.

A generation directory (checkpoints/gen_NNNN) also gets the state.json of the round checkpoint written at
that generation's end, as resume.json: with no round checkpoint intact, the run continues from the newest
generation directory that has one and loads (`latest_generation`).
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
from colearn.experience.evaluate import EnvScore
from colearn.learning.learn import optimizer_for
from colearn.models.build import resolve_device
from colearn.models.directories import is_mixture
from colearn.models.partner import Partner

log = logging.getLogger(__name__)
KEEP = 2  # round checkpoints kept besides the newest generation ones
RESUME_FILE = "resume.json"  # in a generation directory: the loop state at the start of the next generation


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
        p.save(tmp / "partners" / p.name, home=final / "partners" / p.name)
    state.ancestor.save(tmp / "ancestor", home=final / "ancestor")
    meta = {
        "generation": state.generation,
        "round": state.round,
        "env_steps": state.env_steps,
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
    for d in sorted((d for d in root.glob("round_g*") if d.is_dir() and not d.name.endswith(".tmp")), reverse=True):
        if is_intact(d):
            return d
        log.warning("checkpoint %s is damaged (checksum mismatch or missing file); trying an older one", d)
        print(f"colearn: checkpoint {d.name} is damaged; falling back to an older one")
    return None


def load_checkpoint(path: Path, cfg: Config) -> tuple[dict[str, Any], list[Partner], Partner]:
    """Returns (state metadata, partners with optimizer state, ancestor) stored at `path`."""
    if not is_intact(path):
        raise ColearnError(f"checkpoint {str(path)!r} is damaged; delete it to resume from an older one")
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    device = resolve_device(cfg.device)
    partners = [load_partner(path / "partners" / spec["name"], spec, cfg, device) for spec in meta["partners"]]
    ancestor = in_fresh_memory(Partner.load(path / "ancestor", "ancestor", cfg.model, device))
    return restored(meta), partners, ancestor


def load_partner(
    path: Path, spec: dict[str, Any], cfg: Config, device: torch.device, optimizer: bool = True
) -> Partner:
    """Returns the partner `spec` ({name, envs}) with the weights at `path`, and with `optimizer` its
    optimizer state when `path` holds one."""
    partner = in_fresh_memory(Partner.load(path, spec["name"], cfg.model, device))
    partner.envs = list(spec["envs"])
    if optimizer and (path / "optimizer.pt").exists():
        state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        optimizer_for(partner, cfg.learn).load_state_dict(state)
    return partner


def in_fresh_memory(partner: Partner) -> Partner:
    """Returns the partner with its weights copied into memory of their own. Loaded weights can sit at any
    offset in the file's mapping, and for some shapes BLAS sums in another order when a tensor is not 64-byte
    aligned: a resumed run must compute exactly what the uninterrupted one did with its weights in memory."""
    with torch.no_grad():
        for p in partner.model.parameters():
            p.data = p.data.clone()
    return partner


def restored(meta: dict[str, Any]) -> dict[str, Any]:
    """Sets torch's global RNG from a checkpoint's metadata and returns the metadata with its scores typed."""
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    meta["last_scores"] = {k: [EnvScore(**s) for s in v] for k, v in meta["last_scores"].items()}
    return meta


def mark_resumable(generation_dir: Path, checkpoint: Path) -> None:
    """Copies the state.json of `checkpoint` (written at the end of the generation saved in `generation_dir`)
    into that directory as resume.json, written aside and renamed into place."""
    if not generation_dir.is_dir():  # pruned (loop.keep_generations)
        return
    tmp = generation_dir / (RESUME_FILE + ".tmp")
    shutil.copyfile(checkpoint / "state.json", tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, generation_dir / RESUME_FILE)


Loaded = tuple[dict[str, Any], list[Partner], Partner]  # (state metadata, partners, ancestor)


def latest_generation(root: Path, cfg: Config) -> tuple[Path, Loaded, str] | None:
    """Returns (path, what `load_generation` returns, a note for the user) of the newest generation directory
    under `root` that can seed a resume, logging each one it skips; None when there is none."""
    for d in sorted((d for d in root.glob("gen_*") if d.is_dir() and not d.name.endswith(".tmp")), reverse=True):
        if not (d / RESUME_FILE).is_file():
            log.warning("generation directory %s has no %s; trying an older one", d, RESUME_FILE)
            continue
        try:
            loaded = load_generation(d, cfg)
        except Exception as e:  # noqa: BLE001 - whatever stops this one loading, an older one may not have
            log.warning("generation directory %s does not load (%s); trying an older one", d, e)
            print(f"colearn: generation directory {d.name} does not load; falling back to an older one")
            continue
        return d, loaded, generation_note(d, loaded[0])
    return None


def load_generation(path: Path, cfg: Config) -> Loaded:
    """Returns (state metadata, partners, ancestor) at the start of the generation after the one saved at
    `path`, as the loop's `next_generation` made them (`starts`); a partner going on has its optimizer state
    where the directory kept it."""
    meta = json.loads((path / RESUME_FILE).read_text(encoding="utf-8"))
    recipe = meta["lineage"][-1]["recipe"]
    device = resolve_device(cfg.device)
    child = path / "offspring"
    if is_mixture(child):  # the loop seeds the next generation with the best member's copy
        child = child / "members" / recipe["source"]
    start = starts(recipe, [spec["name"] for spec in meta["partners"]])
    partners = [
        load_partner(path / start[spec["name"]], spec, cfg, device, optimizer=start[spec["name"]] == spec["name"])
        for spec in meta["partners"]
    ]
    ancestor = in_fresh_memory(Partner.load(child, "ancestor", cfg.model, device))
    return restored(meta), partners, ancestor


def starts(recipe: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Returns {partner: the directory, relative to a generation directory, it starts the next generation from}, as
    the offspring's `next_partners` chose by its recipe: its own (it goes on: after a copy of the best partner or a
    fallback, with several partners), its cluster's merge in the mixture (merge.fallback=cluster), or the
    offspring."""
    if recipe.get("fallback") == "cluster":
        merged = {
            n: f"offspring/members/{c['name']}"
            for c in recipe["clusters"]
            if c["outcome"] == "merged"
            for n in c["members"]
        }
        return {n: merged.get(n, n) for n in names}
    going_on = recipe["method"] == "copy_best" and len(names) > 1
    return {n: n if going_on else "offspring" for n in names}


def generation_note(path: Path, meta: dict[str, Any]) -> str:
    """Says that no round checkpoint was intact, and when the partners go on without their optimizer state."""
    names = [spec["name"] for spec in meta["partners"]]
    note = "; no round checkpoint was intact"
    going_on = [n for n, start in starts(meta["lineage"][-1]["recipe"], names).items() if start == n]
    lost = not all((path / n / "optimizer.pt").exists() for n in going_on)
    if lost:
        note += (
            "; the partners' optimizer state was not kept there (loop.keep_generations), so they go on "
            "with fresh optimizers and the run will differ from an uninterrupted one"
        )
    return note
