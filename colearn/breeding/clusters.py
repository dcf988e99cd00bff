"""A population clustered by compatibility (merge.fallback=cluster): which partners may be averaged together.

Partners are grouped by complete linkage (agglomerative, farthest neighbour) on the pairwise
merge.compat_metric: starting from one cluster per partner, the two clusters whose *least* compatible
pair is the most compatible are joined, as long as that pair still reaches merge.compat_threshold. So
every pair inside a cluster is compatible: the condition under which `make_offspring` averages a whole
population (its worst pair >= the threshold) holds for each cluster, and a population whose pairs all
pass is one cluster. Single linkage (connected components) would chain A~B and B~C into one cluster
even when A and C have drifted apart, which is what the threshold is there to prevent.

`clustered` builds the offspring from the groups: each cluster of two or more merged (by the merge function
`make_offspring` hands it, so with merge.method and the gate of a whole merge), the envs routed among those
merges and the partners left alone, by their scores on the validation episodes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from colearn.breeding.compatibility import Compatibility
from colearn.breeding.kinds import Clustered, Merged
from colearn.config import MergeConfig
from colearn.errors import ColearnError
from colearn.experience.evaluate import mean_over_envs
from colearn.models.partner import Partner

Similarity = Mapping[tuple[str, str], float]  # (a, b) -> compat metric of the pair, either order
EnvScorer = Callable[[Partner], dict[str, float]]  # policy -> {env: normalized return} on validation episodes


def pair_similarity(compat: Compatibility, metric: str) -> dict[tuple[str, str], float]:
    """Returns {(a, b): the pair's merge.compat_metric} of every measured pair (cka or cosine)."""
    values = {pair: getattr(c, metric) for pair, c in compat.pairs.items()}
    if any(v is None for v in values.values()):
        raise ColearnError(
            f"merge.fallback=cluster with merge.compat_metric={metric} needs probe observations to measure it; "
            "pass a probe set or use merge.compat_metric=cosine"
        )
    return values


def compatible_groups(names: Sequence[str], similarity: Similarity, threshold: float) -> list[list[str]]:
    """Returns the partners grouped by complete linkage: clusters in which every pair's similarity is >=
    `threshold` (a threshold <= 0 makes every pair compatible, as merge.compat_threshold=0 does), each cluster's
    names in the order of `names` and clusters ordered by their first member. Ties between candidate joins go
    to the pair of clusters that comes first in that order, so the result is deterministic."""

    def value(a: str, b: str) -> float:
        return similarity[(a, b)] if (a, b) in similarity else similarity[(b, a)]

    def linkage(x: list[str], y: list[str]) -> float:  # the least compatible pair across the two clusters
        return min(value(a, b) for a in x for b in y)

    if threshold <= 0:
        return [list(names)]
    clusters = [[n] for n in names]
    while len(clusters) > 1:
        joins = [(linkage(clusters[i], clusters[j]), i, j) for i, j in itertools.combinations(range(len(clusters)), 2)]
        best = max(joins, key=lambda t: t[0])  # max keeps the first of equals: the earliest pair of clusters
        score, i, j = best
        if score < threshold:
            break
        clusters[i] = sorted(clusters[i] + clusters[j], key=list(names).index)
        del clusters[j]
    return clusters


def cluster_name(members: Sequence[str]) -> str:
    """Returns the name a cluster's merge goes by in the mixture (its members joined by "+"; a singleton's own)."""
    return "+".join(members)


def cluster_config(cfg: MergeConfig, indices: Sequence[int]) -> MergeConfig:
    """Returns merge.* for the partners at `indices` (positions in env.partners): merge.weights, and the weights of
    any merge.groups entry, cut down to theirs."""
    groups = {
        pattern: {**override, "weights": [override["weights"][i] for i in indices]}
        if "weights" in override
        else override
        for pattern, override in cfg.groups.items()
    }
    weights = [cfg.weights[i] for i in indices] if cfg.weights else []
    return dataclasses.replace(cfg, weights=weights, groups=groups)


def best_routes(scores: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Returns {env: the member with the highest score on it} from {member: {env: score}}; ties go to the member
    listed first."""
    envs = dict.fromkeys(env for by_env in scores.values() for env in by_env)
    return {env: max((m for m in scores if env in scores[m]), key=lambda m: scores[m][env]) for env in envs}


def clustered(
    partners: Sequence[Partner],
    parent_scores: Mapping[str, float],
    cfg: MergeConfig,
    measured: Compatibility,
    merge: Callable[[list[int]], Merged],
    env_score_fn: EnvScorer | None,
    partner_routes: Mapping[str, str],
    reason: str,
    **decision: Any,
) -> Clustered:
    """Returns the merge.fallback=cluster offspring: the partners grouped by compatibility
    (`clusters.compatible_groups` on merge.compat_metric and merge.compat_threshold), each cluster of two or more
    merged by `merge` (indices into `partners`; gated like a whole merge: a refused cluster's partners are routed
    one by one, as are those of a whole-population merge the gate already refused, `decision["attempted"]`), and
    each env routed to the member (cluster merge or partner) that `env_score_fn` scores best on it. Without
    `env_score_fn`, an env goes to the member holding the partner `partner_routes` ({env: partner}) names.
    `decision` holds the compat, gate or gate_skipped, and attempted fields of the result."""
    names = [p.name for p in partners]
    similarity = pair_similarity(measured, cfg.compat_metric) if cfg.compat_threshold > 0 else {}
    groups = compatible_groups(names, similarity, cfg.compat_threshold)
    members: list[Partner] = []
    holder: dict[str, str] = {}  # partner -> the member of the mixture that holds it
    records = []
    for group in groups:
        record: dict[str, Any] = {"name": cluster_name(group), "members": group, "outcome": "single"}
        tried = None
        if len(group) == len(partners) and "attempted" in decision:  # the merge the gate refused: not tried again
            record |= {"outcome": "refused", "gate": dataclasses.asdict(decision["gate"])}
        elif len(group) > 1:
            tried = merge([names.index(n) for n in group])
            record |= {"outcome": "merged" if tried.promoted else "refused", "merge": tried.attempt()}
            record["gate"] = tried.gate_record()
        if tried is not None and tried.promoted:
            members.append(tried.partner)
            holder |= dict.fromkeys(group, tried.partner.name)
        else:
            members += [partners[names.index(n)] for n in group]
            holder |= {n: n for n in group}
        records.append(record)
    member_scores = {m.name: env_score_fn(m) for m in members} if env_score_fn is not None else {}
    if member_scores:
        routing = best_routes(member_scores)
        best = max(members, key=lambda m: mean_over_envs(member_scores[m.name]))
    else:
        routing = {env: holder[owner] for env, owner in partner_routes.items()}
        best_partner = max(partners, key=lambda p: parent_scores[p.name]).name
        best = next(m for m in members if m.name == holder[best_partner])
    return Clustered(
        partner=best.clone("offspring"),
        source=best.name,
        reason=reason,
        routing=routing,
        members=members,
        clusters=records,
        member_scores=member_scores,
        **decision,
    )
