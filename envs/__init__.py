"""Gymnasium environments with text observations and actions, registered as ``colearn/...``.

``import envs`` registers every id in ``ENV_IDS``.
"""

from __future__ import annotations

from envs.addition import AdditionEnv
from envs.errors import EnvConfigError
from envs.planning import optimal_return, value_table
from envs.registry import ENV_IDS, register_all, text_env_info, text_env_model
from envs.text import TextEnv

register_all()

__all__ = [
    "ENV_IDS",
    "AdditionEnv",
    "EnvConfigError",
    "TextEnv",
    "optimal_return",
    "text_env_info",
    "text_env_model",
    "value_table",
]
