"""What a model directory on disk may hold, told apart before anything loads it: a mixture of several models
(`colearn.breeding.mixture` writes them) is not one model, and a directory that maps to its own Python code is refused.

Light on purpose (no torch, no transformers): `colearn merge` checks its inputs with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from colearn.errors import ColearnError

MIXTURE_MANIFEST = "mixture.json"  # in a mixture directory: its members and the env routing table


def is_mixture(path: str | Path) -> bool:
    """Returns True when `path` is a mixture directory (it holds mixture.json)."""
    return (Path(path) / MIXTURE_MANIFEST).is_file()


def refuse_custom_code(path: Path, role: str) -> None:
    """Raises ColearnError when the model directory's config or tokenizer config maps to its own Python code
    (`auto_map`): loading it would run that code, and colearn never runs code from a model directory."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent or unreadable: the loader itself reports what is missing
        if isinstance(config, dict) and config.get("auto_map"):
            raise ColearnError(
                f"{role} {str(path)!r} needs its own Python code ({name} has auto_map), which "
                "colearn never runs; use a model whose architecture transformers ships"
            )
