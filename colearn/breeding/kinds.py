"""The kinds of offspring a generation can have, as `make_offspring` (colearn.breeding.offspring) returns them:
`Merged`, `Copy` (of the best partner), `Mixture` (the partners routed per env) or `Clustered` (the merges of the
compatible clusters routed per env), each with the promotion gate's decision, `recipe()` (the record lineage.json
and metrics.jsonl keep) and `next_partners` (who the next generation starts from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from colearn.models.partner import Partner


@dataclass(frozen=True)
class Gate:
    """The promotion decision of merge.gate: passed when offspring >= best_parent - tolerance."""

    offspring: float  # the offspring's mean normalized return on the validation episodes
    best_parent: float  # the best parent's, re-scored on the same episodes
    parents: dict[str, float]  # every parent's
    tolerance: float  # merge.gate_tolerance
    passed: bool
    fallback: str | None  # merge.fallback taken instead of the offspring; None when it passed


@dataclass(kw_only=True)
class Offspring:
    """A generation's offspring; `partner` is the one set of weights that seeds the next generation."""

    partner: Partner
    compat: dict[str, Any] | None = None  # `Compatibility.worst` of the partners with metric, threshold and compatible;
    # None when no merge was considered (merging off, or one partner)
    gate: Gate | None = None  # the promotion decision, when the gate ran
    gate_skipped: str | None = None  # why the gate did not run, when a merge was considered

    @property
    def promoted(self) -> bool:
        """Whether the offspring becomes the run's deployed model: all but those the gate refused."""
        return self.gate is None or self.gate.passed

    def recipe(self) -> dict[str, Any]:
        """Returns how the offspring was made, as plain data: the record lineage.json and metrics.jsonl keep."""
        raise NotImplementedError

    def gate_record(self) -> dict[str, Any]:
        """Returns the gate's decision as plain data, or why it did not run."""
        return dataclasses.asdict(self.gate) if self.gate is not None else {"skipped": self.gate_skipped}

    def next_partners(self, partners: list[Partner]) -> list[Partner]:
        """Returns the partners the next generation starts from (before the curriculum places them): copies of the
        offspring, with fresh optimizers."""
        return [self.partner.clone(p.name, p.envs) for p in partners]


@dataclass(kw_only=True)
class Merged(Offspring):
    """The partners merged in weight space relative to their ancestor."""

    merge: dict[str, Any]  # the merge's recipe (`Recipe.as_dict`; evolve's names its base_method and search)
    lora: dict[str, Any] = field(default_factory=dict)  # how a LoRA offspring was made; {} for full weights

    def recipe(self) -> dict[str, Any]:
        lora = {"lora": self.lora} if self.lora else {}
        return {**self.merge, "compat": self.compat, **lora, "gate": self.gate_record(), "outcome": "merged"}

    def attempt(self) -> dict[str, Any]:
        """Returns the merge's recipe with its LoRA record: what a fallback records as the merge it refused."""
        return {**self.merge, **({"lora": self.lora} if self.lora else {})}


@dataclass(kw_only=True)
class Copy(Offspring):
    """A copy of the best partner: merging is off or there is one partner, or the fallback of a merge not taken."""

    source: str  # the copied partner's name
    reason: str | None = None  # why a considered merge was not taken; None when none was considered
    attempted: dict[str, Any] | None = None  # the merge the gate refused (`Merged.attempt`)

    def recipe(self) -> dict[str, Any]:
        if self.reason is None:
            return {"method": "copy_best", "source": self.source, "outcome": "copy"}
        attempted = {"attempted": self.attempted} if self.attempted is not None else {}
        return {
            "method": "copy_best",
            "source": self.source,
            "outcome": "fallback",
            "fallback": self.fallback_name,
            "reason": self.reason,
            "compat": self.compat,
            "gate": self.gate_record(),
            **attempted,
        }

    @property
    def fallback_name(self) -> str:
        """The merge.fallback this offspring is."""
        return "best"

    def next_partners(self, partners: list[Partner]) -> list[Partner]:
        """Several partners go on as they are (optimizers included); one starts again from its copy."""
        return partners if len(partners) > 1 else super().next_partners(partners)


@dataclass(kw_only=True)
class Mixture(Copy):
    """The partners routed per env (merge.fallback=mixture), evaluated and saved as a mixture directory
    (`colearn.breeding.mixture`); `partner` is the best partner's copy, as one set of weights cannot hold the
    routing."""

    routing: dict[str, str]  # env -> name of the member that acts in it
    members: list[Partner]  # the models `routing` names: here the partners themselves

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "mixture": self.routing}

    @property
    def fallback_name(self) -> str:
        return "mixture"


@dataclass(kw_only=True)
class Clustered(Mixture):
    """merge.fallback=cluster: the partners grouped by compatibility (`clusters.compatible_groups`), each cluster of
    two or more merged by merge.method (and gated like a whole merge), routed per env among those merges and
    the partners left alone. `partner`, the one set of weights that becomes the next ancestor, is the best
    member's copy; `source` names that member."""

    clusters: list[dict[str, Any]]  # per cluster, in partner order: members, name (its member's name in the
    # mixture), outcome ("merged"; "single": one partner; "refused": its merge failed the gate, so its partners
    # are routed one by one) and, for a merge tried, its recipe and gate
    member_scores: dict[str, dict[str, float]]  # member -> env -> validation score the routing chose by ({}
    # when no scorer was given: then each env goes to the member holding the partner best on it)

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "method": "cluster", "clusters": self.clusters, "member_scores": self.member_scores}

    @property
    def fallback_name(self) -> str:
        return "cluster"

    def next_partners(self, partners: list[Partner]) -> list[Partner]:
        """A partner of a merged cluster starts again from its cluster's merge (fresh optimizer, as after a merge);
        the others go on as they are."""
        merged = {n: c["name"] for c in self.clusters if c["outcome"] == "merged" for n in c["members"]}
        by_name = {m.name: m for m in self.members}
        return [by_name[merged[p.name]].clone(p.name, p.envs) if p.name in merged else p for p in partners]
