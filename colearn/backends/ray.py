"""The Ray backend: one Ray actor per partner owns the partner's model, optimizer and vector envs, and plays, learns
and is evaluated there, every partner at once. The loop keeps its own copy of each partner (`LoopState.partners`):
`pull` brings what learning changed back into it (the loop measures compatibility, checkpoints and merges there),
and `push` places a new partner (the offspring's copy, a resumed one) in its actor. A partner travels to its actor
as the files of its saved directory, optimizer state included, and is loaded there as a resumed run loads a
checkpoint's (a pickled Hugging Face model can arrive broken: transformers' output-capturing hooks are closures over
a module-level context variable, which a pickled copy of the closure no longer shares).

Experience travels through Ray's object store: an actor returns its step records to the loop, which writes them to
the Arrow store in partner order (one writer: shard numbers, and the shard count a checkpoint records, are as in a
local run), and each lesson carries the records the loop read back from the store, so no path needs to be shared
between machines. Ray itself is imported on use: colearn runs without it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from colearn.backends.work import (
    Episodes,
    LearnedState,
    Lesson,
    Rows,
    assess,
    learned_state,
    play,
    restore_learned,
    study,
)
from colearn.config import Config, EnvSpec, RayConfig
from colearn.errors import ColearnError
from colearn.experience.evaluate import EnvScore
from colearn.models.partner import Partner
from colearn.rundir.checkpoint import load_partner

log = logging.getLogger(__name__)


class PartnerActor:
    """One partner in a Ray actor (`ray.remote` makes it one): it holds the partner and runs its phases."""

    def __init__(self, cfg: Config) -> None:
        transformers.utils.logging.disable_progress_bar()  # an actor's bars would cut into the run's own
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        # Ray makes an actor's GPU share visible as cuda:0
        self.device = torch.device("cuda" if cfg.ray.num_gpus else "cpu")
        self.venvs: dict[tuple[str, int], Any] = {}
        self.partner: Partner | None = None

    def load(self, partner: PartnerFiles) -> None:
        """Takes the partner (with its optimizer state, when it has learned before)."""
        self.partner = unpacked(partner, self.cfg, self.device)

    def play(self, work: list[Episodes]) -> Rows:
        return play(self.partner, work, self.cfg, self.venvs)

    def learn(self, lesson: Lesson, teachers: list[PartnerFiles]) -> dict[str, float]:
        if teachers:
            lesson = dataclasses.replace(lesson, teachers=[unpacked(t, self.cfg, self.device) for t in teachers])
        return study(self.partner, lesson, self.cfg)

    def evaluate(self, suite: list[EnvSpec]) -> list[EnvScore]:
        return assess(self.partner, suite, self.cfg, self.venvs)

    def learned(self) -> LearnedState | None:
        return learned_state(self.partner)

    def close(self) -> None:
        for venv in self.venvs.values():
            venv.close()


class RayBackend:
    """Runs each partner's phases in its own Ray actor, all partners at once."""

    def __init__(self, cfg: Config, venvs: dict[tuple[str, int], Any] | None = None) -> None:
        self.ray = ray_module()
        self.cfg = cfg
        self.actors: list[Any] = []
        self.placed: list[Partner] = []  # the loop's partner each actor holds a copy of
        self.connected = connect(self.ray, cfg.ray, len(cfg.env.partners))
        try:
            check_room(self.ray, cfg.ray, len(cfg.env.partners))
        except ColearnError:
            self.close()
            raise
        self.actor_class = self.ray.remote(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)(PartnerActor)

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def push(self, partners: list[Partner]) -> None:
        """Places each of the loop's partners in its actor (an actor per partner, made on first use), unless the
        actor already holds it: after `pull` the loop's copy and the actor's are the same."""
        while len(self.actors) < len(partners):
            self.actors.append(self.actor_class.remote(self.cfg))
        loads = [
            actor.load.remote(packed(p))
            for i, (actor, p) in enumerate(zip(self.actors, partners))
            if i >= len(self.placed) or self.placed[i] is not p
        ]
        self.ray.get(loads)
        self.placed = list(partners)

    def play(self, work: list[list[Episodes]]) -> list[Rows]:
        """Returns each partner's step records of its episodes (`work[i]` is partner i's)."""
        return self.ray.get([a.play.remote(w) for a, w in zip(self.actors, work, strict=True)])

    def learn(self, lessons: list[Lesson]) -> list[dict[str, float]]:
        """Updates each partner in its actor on its lesson; returns each one's training statistics."""
        teachers = [[packed(t) for t in lesson.teachers] for lesson in lessons]
        calls = [
            a.learn.remote(dataclasses.replace(lesson, teachers=[]), mine)
            for a, lesson, mine in zip(self.actors, lessons, teachers, strict=True)
        ]
        return self.ray.get(calls)

    def evaluate(self, suite: list[EnvSpec]) -> list[list[EnvScore]]:
        """Returns each partner's scores on every env of the suite, evaluated in its actor."""
        return self.ray.get([a.evaluate.remote(suite) for a in self.actors])

    def pull(self, partners: list[Partner]) -> None:
        """Copies what learning changed in each actor's partner (trained tensors, optimizer state) into the loop's."""
        states = self.ray.get([a.learned.remote() for a in self.actors])
        for partner, state in zip(partners, states, strict=True):
            restore_learned(partner, state, self.cfg.learn)

    def close(self) -> None:
        """Ends the actors, and the Ray session this backend began (a cluster it attached to goes on)."""
        try:
            self.ray.get([a.close.remote() for a in self.actors], timeout=60)
        except self.ray.exceptions.RayError as e:  # an actor that died has nothing left to close
            log.warning("closing the partners' actors: %s", e)
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors, self.placed = [], []
        if self.connected:
            self.ray.shutdown()


@dataclass
class PartnerFiles:
    """A partner as the files of its saved directory (`Partner.save`: weights, tokenizer, value head, optimizer
    state), by path relative to it."""

    name: str
    envs: list[str]
    files: dict[str, bytes]


def packed(partner: Partner) -> PartnerFiles:
    """Returns the partner's saved directory as bytes: what travels to an actor."""
    with tempfile.TemporaryDirectory(prefix="colearn-partner-") as tmp:
        partner.save(tmp)
        files = {str(f.relative_to(tmp)): f.read_bytes() for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
    return PartnerFiles(partner.name, list(partner.envs), files)


def unpacked(partner: PartnerFiles, cfg: Config, device: torch.device) -> Partner:
    """Returns the partner `packed` made, loaded on `device` as a resumed run loads a checkpoint's."""
    with tempfile.TemporaryDirectory(prefix="colearn-partner-") as tmp:
        for name, data in partner.files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return load_partner(Path(tmp), {"name": partner.name, "envs": partner.envs}, cfg, device)


def ray_module() -> Any:
    """Returns the `ray` package, or a ColearnError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ColearnError("backend=ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from e
    return ray


def connect(ray: Any, cfg: RayConfig, partners: int) -> bool:
    """Attaches to the cluster ray.address names, or starts a local Ray with room for every partner's actor;
    returns whether it did (the backend then ends the session at the run's end). A Ray session this process
    already has (a notebook's, a test's) is used as it is, and left running."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"runtime_env": cfg.runtime_env or None, "logging_level": logging.WARNING}
    if cfg.address:
        ray.init(address=cfg.address, **options)
    else:
        # a local Ray counts this machine's cores; actors that reserve more wait forever, so it counts enough
        cpus = max(os.cpu_count() or 1, math.ceil(partners * cfg.num_cpus))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
    return True


def check_room(ray: Any, cfg: RayConfig, partners: int) -> None:
    """Raises ColearnError when the cluster has fewer CPUs or GPUs than the partners' actors reserve (Ray would
    leave them waiting for ever)."""
    have = ray.cluster_resources()
    for resource, each, field in (("CPU", cfg.num_cpus, "ray.num_cpus"), ("GPU", cfg.num_gpus, "ray.num_gpus")):
        if partners * each > have.get(resource, 0):
            raise ColearnError(
                f"{field}={each} for {partners} partners needs {partners * each:g} {resource}s; the Ray cluster has "
                f"{have.get(resource, 0):g}: lower {field} (fractions share one) or add nodes"
            )
