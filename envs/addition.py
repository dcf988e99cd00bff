"""``AdditionEnv``: a procedurally generated one-step arithmetic task with exact-match reward."""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from envs.errors import EnvConfigError
from envs.render import TEXT_CHARSET


class AdditionEnv(gym.Env):
    """Observe ``"12+34="``, answer ``"46"``; one step per episode.

    Reward is 1.0 for the exact answer and 0.0 otherwise; answers that are not
    all digits get ``invalid_penalty`` and ``info["invalid_action"] = True``.
    Answers are free-form, so ``action_names`` is None: callers must generate.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, digits: int = 2, invalid_penalty: float = 0.0) -> None:
        """Create the task for operands with at most ``digits`` digits."""
        if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
            raise EnvConfigError(f"env.digits must be an int >= 1, got {digits!r}")
        self.digits = digits
        self.invalid_penalty = float(invalid_penalty)
        self.action_names: list[str] | None = None
        # an n-digit + n-digit sum has at most n+1 digits
        self.observation_space = spaces.Text(max_length=2 * digits + 2, charset=TEXT_CHARSET)
        # the answer's alphabet and length: a generating policy can be held to them (`text_env_info`)
        self.action_space = spaces.Text(max_length=digits + 1, min_length=1, charset=string.digits)
        self._a = 0
        self._b = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Draw a new problem; returns ``("a+b=", info)``."""
        super().reset(seed=seed)
        high = 10**self.digits
        self._a = int(self.np_random.integers(0, high))
        self._b = int(self.np_random.integers(0, high))
        return self._problem(), {"invalid_action": False, "success": False}

    def step(self, action: str | int) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Grade ``action``; returns ``(problem_text, reward, True, False, info)``."""
        parsed = self.parse_action(action)
        correct = parsed == self.answer()
        if parsed is None:
            reward = self.invalid_penalty
        else:
            reward = 1.0 if correct else 0.0
        info = {"invalid_action": parsed is None, "success": correct}
        return self._problem(), reward, True, False, info

    def parse_action(self, action: str | int) -> str | None:
        """Return the stripped answer if it is all ASCII digits, else None."""
        text = str(action).strip()
        # isascii: str.isdigit alone accepts e.g. superscript digits
        return text if text.isascii() and text.isdigit() else None

    def answer(self) -> str:
        """Return the correct answer text for the current problem."""
        return str(self._a + self._b)

    def optimal_return(self, horizon: int | None = None) -> float:
        """Return 1.0: one correct answer is always possible (``horizon`` >= 1 assumed)."""
        return 1.0

    def random_return(self, horizon: int | None = None) -> float:
        """Return 0.0, the floor scores are normalized from: a uniformly random answer is almost never the sum
        (the env has no transition table to compute that small chance exactly)."""
        return 0.0

    def _problem(self) -> str:
        """Return the current problem text, e.g. ``"12+34="``."""
        return f"{self._a}+{self._b}="
