"""The offspring of a generation: the partners merged in weight space relative to their ancestor.

Before merging, the partners' compatibility is measured for every pair (task-vector cosine, sign conflicts,
CKA of their representations); partners that drifted apart (Pari et al., "Collective Model Intelligence
Requires Compatible Specialization") are not averaged but fall back to the best partner, a mixture of them,
or (merge.fallback=cluster) a mixture of the merges of their compatible clusters (`colearn.breeding.clusters`).
After merging, a gate promotes the offspring only if it is about as good as its best parent on validation
episodes.  The result is a `Merged`, `Copy`, `Mixture` or `Clustered` carrying its compatibility numbers and
gate decision; its `recipe()` is the record the loop writes to lineage.json and metrics.jsonl, its
`next_partners` the partners the next generation starts from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from colearn.breeding.clusters import EnvScorer, cluster_config, cluster_name, clustered
from colearn.breeding.compatibility import Compatibility, measure
from colearn.breeding.kinds import Copy, Gate, Merged, Mixture, Offspring
from colearn.config import MergeConfig
from colearn.errors import ColearnError
from colearn.merging.evolve import search, start_recipe
from colearn.merging.lora_merge import adapter_for, lora_factors, lora_scaling
from colearn.merging.merge import Recipe, merge_state_dicts
from colearn.models.build import with_lora
from colearn.models.partner import Partner
from colearn.models.weights import dense_state, load_weights, untied

Scorer = Callable[[Partner], float]  # policy -> mean normalized return on fixed validation episodes


# --------------------------------------------------------------------------- weights


def merge_recipe(cfg: MergeConfig, n_partners: int) -> Recipe:
    """Returns the checked recipe of merge.* for n partners (equal weights when merge.weights is empty)."""
    return Recipe.from_config(cfg, n_partners).check(n_partners)


def merged_weights(ancestor: Partner, partners: Sequence[Partner], recipe: Recipe) -> dict[str, torch.Tensor]:
    """Returns the merged dense weights of the partners relative to the ancestor."""
    return merge_state_dicts(dense_state(ancestor), [dense_state(p) for p in partners], recipe)


def offspring_from(
    ancestor: Partner,
    weights: Mapping[str, torch.Tensor],
    lora_offspring: str = "fold",
    name: str = "offspring",
    seed: int = 0,
) -> tuple[Partner, dict[str, Any]]:
    """Returns a new partner with the ancestor's architecture (and adapter layout) holding `weights`, and a
    record of how a LoRA offspring was made ({} for full-weight partners).

    LoRA ancestors (merge.lora_offspring): "fold" puts the merged change into the base and a fresh
    adapter on top, so the next generation again trains adapters from zero; "adapter" keeps the base
    frozen and re-factorizes the change into the adapter at its rank (truncated SVD, Eckart-Young),
    recording the relative truncation error. `seed` draws the fresh adapter's initial factors (peft draws them from
    torch's global RNG, which nothing else in a run seeds: unseeded, two runs of one config would differ)."""
    child = ancestor.clone(name)
    if not hasattr(child.model, "peft_config"):
        load_weights(child.model, weights)
        return child, {}
    if lora_offspring == "adapter":
        return child, {"lora_offspring": "adapter", **refactorized_adapter(child.model, weights)}
    base = copy.deepcopy(child.model).merge_and_unload()
    load_weights(base, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        child.model = with_lora(base, ancestor.cfg)
    return child, {"lora_offspring": "fold"}


def refactorized_adapter(model: Any, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Sets the peft model's adapter so that base + adapter approximates `weights` at the adapter's rank;
    returns {rank, truncation_error}."""
    config = model.peft_config[model.active_adapter]
    if config.rank_pattern or config.alpha_pattern:
        raise ColearnError(
            "merge.lora_offspring=adapter needs one LoRA rank for every module (no rank_pattern or "
            "alpha_pattern); use merge.lora_offspring=fold"
        )
    base = untied(copy.deepcopy(model).unload().state_dict())
    adapted = list(lora_factors(get_peft_model_state_dict(model)))
    scaling = lora_scaling(config.r, config.lora_alpha, config.use_rslora)
    state, error = adapter_for(base, weights, adapted, config.r, scaling, config.fan_in_fan_out)
    set_peft_model_state_dict(model, state)  # copied into the adapter's own dtype: float32 on a bfloat16 base too
    return {"rank": config.r, "truncation_error": error}


def _dense_candidate(ancestor: Partner) -> Partner:
    """Returns one reusable plain (adapter-free) model to load search candidates into, without a disk trip."""
    model = ancestor.model
    model = copy.deepcopy(model).merge_and_unload() if hasattr(model, "peft_config") else copy.deepcopy(model)
    return Partner("candidate", model.eval(), ancestor.tokenizer, ancestor.cfg)


# --------------------------------------------------------------------------- compatibility


def incompatibility(compat: Mapping[str, Any], cfg: MergeConfig) -> str | None:
    """Returns why the partners should not be averaged (merge.compat_metric under merge.compat_threshold), or None."""
    value = compat[cfg.compat_metric]
    if cfg.compat_threshold <= 0:
        return None
    if value is None:
        raise ColearnError(
            f"merge.compat_threshold={cfg.compat_threshold} with merge.compat_metric=cka needs probe observations; "
            "pass a probe set or use merge.compat_metric=cosine"
        )
    if value < cfg.compat_threshold:
        return f"{cfg.compat_metric} {value:.4f} < merge.compat_threshold {cfg.compat_threshold}"
    return None


# --------------------------------------------------------------------------- search


def evolved_weights(
    ancestor: Partner,
    partners: Sequence[Partner],
    cfg: MergeConfig,
    search_fn: Scorer | None,
    evaluate_fn: Scorer | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Returns the weights of the recipe CMA-ES found (merge.method=evolve) and that recipe with its search record.

    Candidates are scored by `search_fn`; the winner and the uniform start are re-scored on
    `evaluate_fn`'s held-out episodes, which is the number to trust.
    """
    if search_fn is None:
        raise ColearnError("merge.method=evolve needs a search_fn that scores candidate offspring on search episodes")
    base, states = dense_state(ancestor), [dense_state(p) for p in partners]
    candidate = _dense_candidate(ancestor)
    result = search(base, states, lambda state: fitness_on(candidate, state, search_fn), cfg)
    record: dict[str, Any] = {
        "budget": cfg.search_budget,
        "fitness": result.fitness,
        "uniform_fitness": result.uniform_fitness,
        "curve": result.curve,
    }
    if evaluate_fn is not None:
        uniform = merge_state_dicts(base, states, start_recipe(cfg, len(partners)))
        record["heldout_uniform"] = fitness_on(candidate, uniform, evaluate_fn)
    weights = merge_state_dicts(base, states, result.recipe)
    if evaluate_fn is not None:
        record["heldout"] = fitness_on(candidate, weights, evaluate_fn)
    found = result.recipe.as_dict()
    recipe = {"method": "evolve", "base_method": found.pop("method"), **found, "search": record}
    return weights, recipe


def fitness_on(candidate: Partner, weights: Mapping[str, torch.Tensor], scorer: Scorer) -> float:
    """Returns the scorer's value of the candidate model holding `weights`."""
    load_weights(candidate.model, weights)
    return float(scorer(candidate))


# --------------------------------------------------------------------------- gate and fallback


def gate_decision(offspring_score: float, parent_scores: Mapping[str, float], cfg: MergeConfig) -> Gate:
    """Returns the promotion decision: passed when offspring >= best parent - merge.gate_tolerance."""
    best_parent = max(parent_scores.values())
    passed = offspring_score >= best_parent - cfg.gate_tolerance
    return Gate(
        offspring_score, best_parent, dict(parent_scores), cfg.gate_tolerance, passed, None if passed else cfg.fallback
    )


def mixture_map(partners: Sequence[Partner], env_scores: Mapping[str, Mapping[str, float]] | None) -> dict[str, str]:
    """Returns {env: name of the partner best on it}: from per-env scores when given (ties: the first partner),
    else each partner's own envs (an env several act in: the first of them).

    This is the routing of a mixture offspring (merge.fallback=mixture): the loop evaluates the partners
    routed by it and saves them with it as a mixture directory (`colearn.breeding.mixture`).
    """
    if not env_scores:
        own: dict[str, str] = {}
        for p in partners:
            own |= {env: p.name for env in p.envs if env not in own}
        return own
    envs = dict.fromkeys(env for p in partners for env in env_scores.get(p.name, {}))
    return {
        env: max((p for p in partners if env in env_scores.get(p.name, {})), key=lambda p: env_scores[p.name][env]).name
        for env in envs
    }


def fallback(
    partners: Sequence[Partner],
    parent_scores: Mapping[str, float],
    cfg: MergeConfig,
    reason: str,
    env_scores: Mapping[str, Mapping[str, float]] | None,
    **decision: Any,
) -> Copy:
    """Returns the merge.fallback offspring and why a merge was not taken: a copy of the best partner
    (fallback=best), or a `Mixture` routing each env to its best partner (fallback=mixture).  `decision`
    holds the compat, gate or gate_skipped, and attempted fields of the result."""
    best = max(partners, key=lambda p: parent_scores[p.name])
    if cfg.fallback == "mixture":
        return Mixture(
            partner=best.clone("offspring"),
            source=best.name,
            reason=reason,
            routing=mixture_map(partners, env_scores),
            members=list(partners),
            **decision,
        )
    return Copy(partner=best.clone("offspring"), source=best.name, reason=reason, **decision)


def merged_offspring(
    ancestor: Partner,
    partners: Sequence[Partner],
    cfg: MergeConfig,
    parent_scores: Mapping[str, float] | None,
    search_fn: Scorer | None,
    evaluate_fn: Scorer | None,
    name: str = "offspring",
) -> Merged:
    """Returns the partners merged by merge.method (evolve: CMA-ES over merge.base_method's recipe, scored by
    `search_fn`) and, given their validation `parent_scores`, the gate's decision on the merge scored by
    `evaluate_fn` on the same episodes (or by the search's held-out score)."""
    if cfg.method == "evolve":
        weights, recipe = evolved_weights(ancestor, partners, cfg, search_fn, evaluate_fn)
    else:
        merge = merge_recipe(cfg, len(partners))
        weights = merged_weights(ancestor, partners, merge)
        recipe = merge.as_dict()
    child, lora = offspring_from(ancestor, weights, cfg.lora_offspring, name, seed=cfg.seed)
    merged = Merged(partner=child, merge=recipe, lora=lora)
    if parent_scores is None or evaluate_fn is None:
        merged.gate_skipped = "merge.gate is off" if not cfg.gate else "no evaluate_fn was given"
        return merged
    offspring_score = recipe.get("search", {}).get("heldout")
    merged.gate = gate_decision(
        offspring_score if offspring_score is not None else float(evaluate_fn(child)), parent_scores, cfg
    )
    return merged


def make_offspring(
    ancestor: Partner,
    partners: list[Partner],
    scores: dict[str, float],
    cfg: MergeConfig,
    *,
    evaluate_fn: Scorer | None = None,
    search_fn: Scorer | None = None,
    probe: Sequence[str] | None = None,
    measured: Compatibility | None = None,
    env_scores: Mapping[str, Mapping[str, float]] | None = None,
    env_score_fn: EnvScorer | None = None,
) -> Offspring:
    """Returns the offspring of a generation: `Merged`, `Copy`, `Mixture` or `Clustered`.

    A copy of the best-scoring partner when merging is off (method "none") or there is one partner. Otherwise: the
    partners' compatibility (`measured`, else measured here on the `probe` prompts: `compatibility.measure`)
    decides: when its worst pair is under merge.compat_threshold, the configured fallback is returned; else all
    partners are merged (`merged_offspring`) and, with merge.gate, the offspring must score within
    merge.gate_tolerance of the best parent under `evaluate_fn` (held-out validation episodes; parents are
    re-scored on the same episodes) or the fallback is returned. `scores` (the loop's last evaluation) picks the
    best partner when `evaluate_fn` is absent; `env_scores` ({partner: {env: score}}) the mixture map;
    `env_score_fn` (per-env scores on the validation episodes) the routing of merge.fallback=cluster.
    """
    if len(partners) == 1 or cfg.method == "none":
        best = max(partners, key=lambda p: scores[p.name])
        return Copy(partner=best.clone("offspring"), source=best.name)
    gated = cfg.gate and evaluate_fn is not None
    parent_scores = {p.name: float(evaluate_fn(p)) for p in partners} if gated else dict(scores)
    measured = measured or measure(ancestor, partners, probe)
    compat = {**measured.worst(), "metric": cfg.compat_metric, "threshold": cfg.compat_threshold}
    reason = incompatibility(compat, cfg)
    compat["compatible"] = reason is None

    def merge(indices: list[int]) -> Merged:
        """The partners at `indices` merged (with their share of merge.weights) and gated."""
        chosen = [partners[i] for i in indices]
        name = "offspring" if len(chosen) == len(partners) else cluster_name([p.name for p in chosen])
        gate_scores = {p.name: parent_scores[p.name] for p in chosen} if gated else None
        return merged_offspring(
            ancestor, chosen, cluster_config(cfg, indices), gate_scores, search_fn, evaluate_fn, name
        )

    def fall_back(why: str, **decision: Any) -> Copy:
        if cfg.fallback == "cluster":
            routes = mixture_map(partners, env_scores)
            return clustered(partners, parent_scores, cfg, measured, merge, env_score_fn, routes, why, **decision)
        return fallback(partners, parent_scores, cfg, why, env_scores, **decision)

    if reason is not None:
        return fall_back(reason, compat=compat, gate_skipped="partners incompatible")
    merged = merge(list(range(len(partners))))
    merged.compat = compat
    if merged.promoted:
        return merged
    reason = (
        f"offspring {merged.gate.offspring:.4f} < best parent {merged.gate.best_parent:.4f} "
        f"- merge.gate_tolerance {cfg.gate_tolerance}"
    )
    return fall_back(reason, compat=compat, gate=merged.gate, attempted=merged.attempt())
