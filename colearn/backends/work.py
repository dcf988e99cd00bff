"""The work a backend runs for one partner, and the code that runs it, the same in this process and in a Ray actor:
a round's episodes in the partner's envs, a lesson on the round's experience, an evaluation. The loop builds the
work and derives every seed in it from the work's position in the loop, so where it runs changes no number.

Learning changes only what the partner's optimizer updates (its trainable tensors and the value head) and the
optimizer's state: `LearnedState` carries that from the copy that learned to another (a Ray actor's to the loop's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from colearn.config import Config, EnvSpec, LearnConfig
from colearn.experience.evaluate import EnvScore, evaluate
from colearn.experience.rollout import EpisodeMeta, collect
from colearn.learning.learn import learn, optimizer_for
from colearn.models.partner import Partner

Rows = list[dict[str, Any]]  # step records (the experience store's columns)


@dataclass
class Episodes:
    """A partner's episodes in one env this round."""

    spec: EnvSpec
    seeds: list[int]  # one reset seed per episode
    sampling_seed: int  # seeds the generator that samples the partner's actions
    meta: EpisodeMeta  # where the steps belong in the experience store


@dataclass
class Lesson:
    """A partner's learning phase this round, on step records read back from the experience store."""

    own: Rows  # the partner's steps this round
    peer: Rows  # the other partners' steps this round (empty without loop.exchange)
    distill: Rows  # the steps it imitates
    seed: int  # seeds the minibatch order and torch's global RNG (dropout) while it learns
    teachers: list[Partner] = field(default_factory=list)  # mutual learning: frozen copies of its peers from
    # before this round's updates
    skipped: str = ""  # why distillation has nothing this round, when it is on and does (logged by the loop)


@dataclass
class LearnedState:
    """What learning changed in a partner: the tensors its optimizer updates, in the optimizer's order, and the
    optimizer's state, on the CPU."""

    params: list[torch.Tensor]
    optimizer: dict[str, Any]


def play(partner: Partner, work: list[Episodes], cfg: Config, venvs: dict) -> Rows:
    """Returns the step records of the partner's episodes in each env of `work`, in order."""
    rows: Rows = []
    for episodes in work:
        generator = torch.Generator().manual_seed(episodes.sampling_seed)
        rows += collect(partner, episodes.spec, episodes.seeds, cfg.rollout, generator, episodes.meta, venvs=venvs)
    return rows


def study(partner: Partner, lesson: Lesson, cfg: Config) -> dict[str, float]:
    """Updates the partner on its lesson (`colearn.learning.learn.learn`); returns the training statistics."""
    with seeded(lesson.seed, partner.device):
        return learn(
            partner,
            lesson.own,
            lesson.peer,
            lesson.distill,
            cfg.learn,
            lesson.seed,
            lesson.teachers,
            cfg.rollout.temperature,
            cfg.rollout.gamma,
        )


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block, torch's global RNG (what dropout draws from) starts from `seed`; after it, it is as before:
    a partner's update depends on its own seed, not on who learned before it in this process."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def assess(partner: Partner, suite: list[EnvSpec], cfg: Config, venvs: dict) -> list[EnvScore]:
    """Returns the partner's scores on every env of the suite (`colearn.experience.evaluate.evaluate`)."""
    return evaluate(partner, suite, cfg.eval, cfg.rollout, venvs)


def learned_state(partner: Partner) -> LearnedState | None:
    """Returns what learning changed in the partner, on the CPU; None before its first update (no optimizer)."""
    if partner.optimizer is None:
        return None
    params = [p.detach().cpu() for p in trained(partner.optimizer)]
    return LearnedState(params, on_cpu(partner.optimizer.state_dict()))


def restore_learned(partner: Partner, state: LearnedState | None, cfg: LearnConfig) -> None:
    """Copies a `learned_state` into the partner (its optimizer made first, as learning makes it)."""
    if state is None:
        return
    optimizer = optimizer_for(partner, cfg)
    with torch.no_grad():
        for param, value in zip(trained(optimizer), state.params, strict=True):
            param.copy_(value)
    optimizer.load_state_dict(state.optimizer)


def trained(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Returns the tensors the optimizer updates, in the order its state dict numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def on_cpu(value: Any) -> Any:
    """Returns `value` (a state dict: dicts, lists, tensors, numbers) with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on_cpu(v) for v in value)
    return value
