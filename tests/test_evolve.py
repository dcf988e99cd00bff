"""Tests of colearn.merging.evolve: the squashed search space and CMA-ES on a merge whose optimum is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colearn.config import MergeConfig
from colearn.merging.evolve import MIN_DENSITY, initial_point, recipe_at, search, search_space, start_recipe
from colearn.merging.merge import Recipe, group_names, merge_state_dicts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(ancestor, [partner A, partner B]): a 2-block tiny Llama and two independent perturbations of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=40,
        )
    )
    ancestor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    partners = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        partners.append({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in ancestor.items()})
    return ancestor, partners


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_every_point_is_a_valid_recipe_and_the_start_point_is_the_start_recipe(states):
    ancestor, _ = states
    cfg = MergeConfig(method="evolve", base_method="ties", density=0.6)
    start = start_recipe(cfg, 2)
    space = search_space(list(ancestor), "ties", 2, max_weight=1.5)
    assert space.groups == group_names(ancestor) and space.dim == 3 * len(space.groups)
    back = recipe_at(space, initial_point(space, start), start)
    for override in back.groups.values():
        assert override["weights"] == pytest.approx([1.0, 1.0], abs=1e-5)  # ties' full step
        assert override["density"] == pytest.approx(0.6, abs=1e-5)
    for x in (np.full(space.dim, -50.0), np.full(space.dim, 50.0), np.random.default_rng(0).normal(0, 9, space.dim)):
        for override in recipe_at(space, x, start).groups.values():
            assert all(0 <= w <= 1.5 for w in override["weights"])
            assert MIN_DENSITY <= override["density"] <= 1
    linear = search_space(list(ancestor), "linear", 2, max_weight=1.5)
    assert "density" not in recipe_at(linear, np.zeros(linear.dim), start).groups["embed"]


def test_cma_es_finds_unequal_group_weights_that_beat_the_uniform_recipe(states):
    ancestor, partners = states
    groups = group_names(ancestor)
    # The optimum is known: a task-arithmetic merge with a different weight pair in every layer group.
    rng = np.random.default_rng(7)
    truth = {g: {"weights": [float(w) for w in rng.uniform(0.1, 1.4, 2)]} for g in groups}
    target = merge_state_dicts(ancestor, partners, Recipe("task_arithmetic", [0.5, 0.5], groups=truth))
    scale = distance(target, ancestor)

    def fitness(state: dict[str, torch.Tensor]) -> float:
        return -distance(state, target) / scale

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    cfg = MergeConfig(method="evolve", base_method="task_arithmetic", search_budget=120, seed=3)
    result = search(ancestor, partners, fitness, cfg)
    assert np.array_equal(np.random.get_state()[1], before)  # the global numpy RNG is left as it was

    assert len(result.curve) == 120
    assert result.curve[0]["fitness"] == result.uniform_fitness
    assert [c["evaluation"] for c in result.curve] == list(range(120))
    assert all(b["best"] >= a["best"] for a, b in zip(result.curve, result.curve[1:]))
    # Uniform [0.5, 0.5] is far from the per-group optimum; the search closes most of that gap.
    assert result.uniform_fitness < -0.3
    assert result.fitness > result.uniform_fitness + 0.2
    assert result.fitness > 0.4 * result.uniform_fitness
    # The returned recipe is the one that scored `fitness`, and it moved toward the true weights.
    merged = merge_state_dicts(
        ancestor, partners, Recipe("task_arithmetic", result.recipe.weights, groups=result.recipe.groups)
    )
    assert fitness(merged) == pytest.approx(result.fitness, abs=1e-9)
    err = np.mean([abs(a - b) for g in groups for a, b in zip(result.recipe.groups[g]["weights"], truth[g]["weights"])])
    assert err < np.mean([abs(0.5 - w) for g in groups for w in truth[g]["weights"]])

    again = search(ancestor, partners, fitness, cfg)
    assert again.curve == result.curve  # seeded


def test_a_budget_of_one_returns_the_start_recipe(states):
    ancestor, partners = states
    cfg = MergeConfig(method="ties", density=0.5, search_budget=1)
    result = search(ancestor, partners, lambda state: 1.0, cfg)
    assert result.recipe == start_recipe(cfg, 2) and result.recipe.groups == {}
    assert [c["fitness"] for c in result.curve] == [1.0]


def test_return_scorer_scores_greedy_on_its_own_seeds(partner, line_spec, lake_spec, monkeypatch):
    import colearn.experience.evaluate
    from colearn.config import EvalConfig, RolloutConfig
    from colearn.experience.evaluate import EnvScore, return_scorer

    seen = []

    def fake_evaluate(policy, suite, cfg, rollout):
        seen.append(cfg)
        return [EnvScore("Line", "greedy", 1.0, 1.0, 1.0, 0.8, 4), EnvScore("Lake", "greedy", 0.0, 0.0, 1.0, 0.2, 4)]

    monkeypatch.setattr(colearn.experience.evaluate, "evaluate", fake_evaluate)
    cfg = EvalConfig(episodes=3, sampled=True, seed=10_000)
    score = return_scorer([line_spec, lake_spec], cfg, RolloutConfig(), seed=20_000, episodes=4)(partner)
    assert score == pytest.approx(0.5)  # the mean normalized return over envs
    assert (seen[0].seed, seen[0].episodes, seen[0].greedy, seen[0].sampled) == (20_000, 4, True, False)
    assert cfg.seed == 10_000  # the caller's config is not changed
