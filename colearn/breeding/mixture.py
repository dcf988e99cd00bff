"""A mixture on disk: partners kept side by side with the table that routes each env to its expert.

When partners are too different to average (or their merge fails the promotion gate) and
merge.fallback=mixture, the offspring is the partners routed per env (`integrate`'s "route" mode); with
merge.fallback=cluster, its members are the merges of the compatible clusters (named like "A+B") and the
partners left alone. One set of weights cannot hold that, so a mixture is a directory of Hugging Face
directories plus a manifest:

    PATH/mixture.json          {"format": "colearn-mixture", "version": 1, "mode": "route",
                                "members": [names], "env_map": {env: member name}, "unmapped_envs": ...}
    PATH/members/<name>/       each member as `Partner.save` writes it (weights, tokenizer; no optimizer)

An env missing from env_map is decided by the member more confident on each observation (higher
max-probability over the legal actions); in free-text envs without legal actions, by the first member.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from colearn.breeding.integrate import Integrated, ModeParams
from colearn.config import ModelConfig
from colearn.errors import ColearnError
from colearn.models.directories import MIXTURE_MANIFEST
from colearn.models.partner import Partner

FORMAT = "colearn-mixture"
VERSION = 1
# what decides in an env that env_map does not name (integrate.route), written into every manifest
UNMAPPED = (
    "the more confident member (higher max-probability over the legal actions) decides each observation; "
    "in a free-text env (no legal actions) the first member acts"
)


def route_params(names: Sequence[str], env_map: Mapping[str, str]) -> ModeParams:
    """Returns route-mode parameters for members `names` from {env: member name} (ModeParams indexes members)."""
    unknown = {env: owner for env, owner in env_map.items() if owner not in names}
    if unknown:
        raise ColearnError(
            f"mixture env_map routes {unknown} to members that are not in the mixture "
            f"{list(names)}; map each env to one of them"
        )
    return ModeParams(env_map={env: list(names).index(owner) for env, owner in env_map.items()})


def member_dir(path: Path, name: str) -> Path:
    """Returns where member `name` of the mixture at `path` lives."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ColearnError(
            f"mixture member name {name!r} cannot be a directory name; rename the partner "
            "(env.partners[].name) to a plain word"
        )
    return path / "members" / name


def save_mixture(
    members: Sequence[Partner], env_map: Mapping[str, str], path: str | Path, home: str | Path | None = None
) -> None:
    """Writes the members routed by `env_map` ({env: member name}) as a mixture directory at `path`.

    Members are saved without optimizer state: a mixture is an offspring to deploy, not a training state (their
    value heads stay, so a run resumed from the generation directory starts from them exactly as it went on).
    Like `Partner.save`, this writes in place; callers that need atomicity write to a temporary dir and pass
    the final place as `home` (where LoRA members' adapter configs say their base models are)."""
    path = Path(path)
    home = path if home is None else Path(home)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ColearnError(f"mixture members must have distinct names, got {names}; rename the partners")
    route_params(names, env_map)  # every env routes to a member
    for m in members:
        dataclasses.replace(m, optimizer=None).save(member_dir(path, m.name), home=member_dir(home, m.name))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "mode": "route",
        "members": names,
        "env_map": dict(env_map),
        "unmapped_envs": UNMAPPED,
    }
    (path / MIXTURE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Returns the checked mixture.json of the mixture at `path`."""
    file = Path(path) / MIXTURE_MANIFEST
    if not file.is_file():
        raise ColearnError(
            f"{str(path)!r} has no {MIXTURE_MANIFEST}; is it a colearn mixture directory "
            "(checkpoints/gen_NNNN/offspring of a run with merge.fallback=mixture)?"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ColearnError(f"{str(file)!r} is not valid JSON ({e}); restore it from the run's checkpoint") from e
    if manifest.get("format") != FORMAT or manifest.get("mode") != "route":
        raise ColearnError(
            f"{str(file)!r} is not a {FORMAT} manifest in route mode "
            f"(format={manifest.get('format')!r}, mode={manifest.get('mode')!r})"
        )
    missing = [k for k in ("members", "env_map") if k not in manifest]
    if missing:
        raise ColearnError(f"{str(file)!r} lacks {missing}; it is torn or hand-edited: restore it from the run")
    if manifest.get("version", VERSION) > VERSION:
        raise ColearnError(
            f"{str(file)!r} has version {manifest['version']}; this colearn reads up to {VERSION}: upgrade colearn"
        )
    return manifest


def load_mixture(
    path: str | Path, cfg: ModelConfig, device: torch.device | str = "cpu", name: str = "mixture"
) -> Integrated:
    """Returns the mixture at `path` as one route-mode policy, each member loaded by `Partner.load` with `cfg`
    (the run's model config: prompt template, action prefix, dtype) and acting in the envs routed to it.

    Bind an env before acting (`policy.in_env(env)`) so its expert decides; unbound, or in an env not in
    env_map, the more confident member decides."""
    path = Path(path)
    manifest = read_manifest(path)
    names, env_map = list(manifest["members"]), dict(manifest["env_map"])
    params = route_params(names, env_map)
    members = []
    for n in names:
        member = Partner.load(member_dir(path, n), n, cfg, device)
        member.envs = [env for env, owner in env_map.items() if owner == n]
        members.append(member)
    return Integrated("route", members, params, name=name)
