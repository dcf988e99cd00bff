"""The backends by name (`config.backend`): where each partner's phases run."""

from __future__ import annotations

from typing import Any

from colearn.backends.local import LocalBackend
from colearn.backends.ray import RayBackend
from colearn.config import Config

Backend = LocalBackend | RayBackend
BACKENDS: dict[str, type[LocalBackend] | type[RayBackend]] = {"local": LocalBackend, "ray": RayBackend}


def make_backend(cfg: Config, venvs: dict[tuple[str, int], Any]) -> Backend:
    """Returns the backend `cfg.backend` names (config.py checks the name); `venvs` is the run's vector-env cache,
    which a backend acting in this process shares."""
    return BACKENDS[cfg.backend](cfg, venvs)
