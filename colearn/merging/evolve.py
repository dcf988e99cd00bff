"""Evolutionary merge: CMA-ES over a merge recipe's per-layer-group weights and densities.

As in Sakana AI's evolutionary model merge (Akiba et al. 2024), the parameters of one merge
operator (e.g. TIES) are searched per layer group (`colearn.merging.merge.group_names`: embed,
block{i}.attn, block{i}.mlp, head) with CMA-ES (Hansen 2016; the `cma` package) against a
task score.  Every candidate is built in memory (`merge_state_dicts`) and scored by a
`fitness(state_dict) -> float` the caller supplies (higher is better); evaluation 0 is
the configured recipe with equal weights, so the search can only return something at least
as good on the episodes it searched on.  Scores on those episodes are optimistic: report the
winner on held-out episodes (`colearn.experience.evaluate.return_scorer` with another seed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from colearn.config import MergeConfig
from colearn.merging.merge import Recipe, group_names, merge_state_dicts

log = logging.getLogger(__name__)

Fitness = Callable[[dict[str, Tensor]], float]

# Operators that take a density; for the others only weights are searched.
DENSITY_METHODS = frozenset({"ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "magnitude_prune"})
MIN_DENSITY = 0.05  # below this almost nothing of a task vector survives
_START_MARGIN = 0.02  # a start on the squash's boundary would need an infinite logit
_DIGITS = 6  # recipes are rounded before scoring, so the YAML written is exactly what was scored


@dataclass(frozen=True)
class SearchSpace:
    method: str  # the operator whose parameters are searched
    groups: list[str]  # layer groups, each with its own weights (and density)
    n_partners: int
    max_weight: float  # weights are squashed into [0, max_weight]
    with_density: bool  # whether each group also has a density, squashed into [MIN_DENSITY, 1]

    @property
    def per_group(self) -> int:
        return self.n_partners + int(self.with_density)

    @property
    def dim(self) -> int:
        return len(self.groups) * self.per_group


@dataclass
class SearchResult:
    recipe: Recipe  # the best recipe (one `groups` override per layer group)
    fitness: float  # its fitness on the search episodes
    uniform_fitness: float  # fitness of the configured (equal-weight) recipe, evaluation 0
    curve: list[dict[str, float]] = field(default_factory=list)  # per evaluation: evaluation, fitness, best


def searched_method(cfg: MergeConfig) -> str:
    """Returns the operator a search tunes: merge.base_method for method=evolve, else merge.method itself."""
    return cfg.base_method if cfg.method == "evolve" else cfg.method


def start_recipe(cfg: MergeConfig, n_partners: int) -> Recipe:
    """Returns the configured recipe of the searched operator (equal weights unless merge.weights is set),
    without group overrides: the search sets those."""
    recipe = Recipe.from_config(cfg, n_partners, method=searched_method(cfg))
    return dataclasses.replace(recipe, groups={}).check(n_partners)


def search_space(keys: Sequence[str], method: str, n_partners: int, max_weight: float) -> SearchSpace:
    """Returns the search space of `method` over the layer groups of the state-dict keys."""
    return SearchSpace(method, group_names(keys), n_partners, max_weight, method in DENSITY_METHODS)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    p = min(max(p, _START_MARGIN), 1 - _START_MARGIN)
    return math.log(p / (1 - p))


def initial_point(space: SearchSpace, start: Recipe) -> np.ndarray:
    """Returns the unsquashed point closest to the start recipe (its weights and density in every group)."""
    weights = [_logit(w / space.max_weight) for w in start.weights]
    density = [_logit((start.density - MIN_DENSITY) / (1 - MIN_DENSITY))] if space.with_density else []
    return np.array((weights + density) * len(space.groups), dtype=float)  # (dim,)


def recipe_at(space: SearchSpace, x: np.ndarray, start: Recipe) -> Recipe:
    """Returns the recipe of point x: the start recipe with one `groups` override per layer group.

    Weights are max_weight * sigmoid(x) and densities MIN_DENSITY + (1 - MIN_DENSITY) * sigmoid(x),
    so every point of R^dim is a valid recipe; values are rounded to 6 digits.
    """
    point = np.asarray(x, dtype=float)[: space.dim]  # (dim,) without `_strategy`'s padding
    squashed = _sigmoid(point.reshape(len(space.groups), space.per_group))  # (groups, per)
    groups = {}
    for name, row in zip(space.groups, squashed):
        override: dict[str, Any] = {
            "weights": [round(float(space.max_weight * v), _DIGITS) for v in row[: space.n_partners]]
        }
        if space.with_density:
            override["density"] = round(float(MIN_DENSITY + (1 - MIN_DENSITY) * row[-1]), _DIGITS)
        groups[name] = override
    return dataclasses.replace(start, groups=groups)


@contextmanager
def _numpy_global_rng_kept() -> Iterator[None]:
    # cma touches numpy's global RNG; the caller's random stream should not depend on whether a search ran.
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _population_size(dim: int, budget: int) -> int:
    # cma's default 4 + 3 ln(dim), shrunk so that a small budget still sees >= 2 generations (CMA-ES only
    # adapts its distribution after a full generation).
    default = 4 + int(3 * math.log(max(dim, 1)))
    return max(2, min(default, (budget - 1) // 2))


def search(
    ancestor: Mapping[str, Tensor],
    partners: Sequence[Mapping[str, Tensor]],
    fitness: Fitness,
    cfg: MergeConfig,
) -> SearchResult:
    """Returns the best recipe CMA-ES finds within merge.search_budget fitness evaluations.

    Evaluation 0 scores the configured recipe (`start_recipe`); the rest are CMA-ES candidates
    around it (step size merge.search_sigma, seeded by merge.seed).  Each evaluation is appended
    to the curve as {evaluation, fitness, best (so far)} and moves a progress bar (shown on a terminal).
    """
    start = start_recipe(cfg, len(partners))
    space = search_space(list(ancestor), start.method, len(partners), cfg.search_max_weight)
    curve: list[dict[str, float]] = []
    best = (-math.inf, start)
    bar = tqdm(total=cfg.search_budget, desc="merge search", unit="candidate", leave=False, disable=None)

    def scored(recipe: Recipe) -> float:
        nonlocal best
        value = float(fitness(merge_state_dicts(ancestor, partners, recipe)))
        if value > best[0]:
            best = (value, recipe)
        curve.append({"evaluation": len(curve), "fitness": value, "best": best[0]})
        log.debug("merge search %d/%d: fitness %.4f (best %.4f)", len(curve), cfg.search_budget, value, best[0])
        bar.set_postfix(best=f"{best[0]:.3f}", refresh=False)
        bar.update(1)
        return value

    with bar:
        uniform = scored(start)
        rng = np.random.default_rng(cfg.seed)
        options = {
            "seed": np.nan,
            "randn": lambda *shape: rng.standard_normal(shape),
            "verbose": -9,
            "popsize": _population_size(space.dim, cfg.search_budget),
        }
        with _numpy_global_rng_kept():
            es = _strategy(initial_point(space, start), cfg.search_sigma, options)
            while len(curve) < cfg.search_budget:
                points = es.ask()[: cfg.search_budget - len(curve)]
                losses = [-scored(recipe_at(space, x, start)) for x in points]  # cma minimizes
                if len(points) == es.popsize:
                    es.tell(points, losses)
    return SearchResult(best[1], best[0], uniform, curve)


def _strategy(x0: np.ndarray, sigma: float, options: dict[str, Any]) -> Any:
    import cma

    if x0.size < 2:  # cma refuses 1-D problems; a dummy coordinate that no recipe reads keeps it general
        x0 = np.append(x0, 0.0)
    return cma.CMAEvolutionStrategy(x0, sigma, options)
