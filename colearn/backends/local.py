"""The local backend: every partner's phases in this process, one partner after another, on the loop's own
partners (what colearn did before it had backends)."""

from __future__ import annotations

from typing import Any

from colearn.backends.work import Episodes, Lesson, Rows, assess, play, study
from colearn.config import Config, EnvSpec
from colearn.experience.evaluate import EnvScore
from colearn.models.partner import Partner


class LocalBackend:
    """Runs each phase on the loop's partners themselves, so `pull` has nothing to bring back."""

    def __init__(self, cfg: Config, venvs: dict[tuple[str, int], Any]) -> None:
        self.cfg = cfg
        self.venvs = venvs  # the run's vector envs, shared with the loop's own evaluations
        self.partners: list[Partner] = []

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def push(self, partners: list[Partner]) -> None:
        """Makes `partners` (the loop's) the ones the next phases run on."""
        self.partners = partners

    def play(self, work: list[list[Episodes]]) -> list[Rows]:
        """Returns each partner's step records of its episodes (`work[i]` is partner i's)."""
        return [play(p, w, self.cfg, self.venvs) for p, w in zip(self.partners, work, strict=True)]

    def learn(self, lessons: list[Lesson]) -> list[dict[str, float]]:
        """Updates each partner on its lesson; returns each one's training statistics."""
        return [study(p, lesson, self.cfg) for p, lesson in zip(self.partners, lessons, strict=True)]

    def evaluate(self, suite: list[EnvSpec]) -> list[list[EnvScore]]:
        """Returns each partner's scores on every env of the suite."""
        return [assess(p, suite, self.cfg, self.venvs) for p in self.partners]

    def pull(self, partners: list[Partner]) -> None:
        """Nothing to do: the loop's partners are the ones that learned."""

    def close(self) -> None:
        """Nothing to release: the loop closes the vector envs it shares."""
