"""Errors raised by the ``envs`` package."""

from __future__ import annotations


class EnvConfigError(ValueError):
    """An environment was configured wrongly (bad id, action names, digits, ...).

    Messages are one line: they name the offending field and say how to fix it.
    """
