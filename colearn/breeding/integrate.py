"""Integration modes: a pair of partners (or an offspring and its parents) acting as one policy.

An `Integrated` has the interface of a `Partner` that `rollout.collect` and `evaluate.evaluate` use
(`act`, `prompt_ids`, `name`, `envs`, `device`), so every mode is scored in the same envs, on the same
seeds, by the same code as a single partner, and can even collect experience.

Each mode turns the members' distributions over the K legal actions, (batch, K) log-probabilities from
`policy.legal_action_logprobs`, into one decision per observation:

    route              the env's expert decides (`env_map`, when the env is known); elsewhere, the more
                       confident member (higher max-probability over the legal actions) decides
    route_confidence   the more confident member decides, always (a router that needs no env names)
    ensemble           consensus: the mean of the members' probabilities (average="probs"), or the
                       renormalized mean of their log-probabilities (average="logprobs", a product of experts)
    check_and_control  member 0 proposes; member 1 vetoes a proposal it gives probability < threshold and
                       then decides itself, among the actions it does not veto
    consultative       member 0 offers its top_k legal actions; member 1 chooses among them by its own probabilities

Behaviour log-probabilities: `act` returns the log-probability of the chosen action under the composite
policy's sampling distribution: the deciding member's for the route modes, the combined distribution's
for ensemble and consultative, and for check_and_control the marginal of the two-stage process,
P(a) = p0(a)·[p1(a) >= threshold] + V·q(a), with V the proposer's vetoed mass and q the checker's accepted
distribution. So importance ratios against an integrated behaviour policy stay exact.

Generate mode (no legal action list, free text): members' distributions are over different sequences
and cannot be combined token-free, so the env's expert (route, with `env_map`) or else member 0
(the proposer) generates alone, and its log-probability is returned.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from colearn.config import EnvSpec, EvalConfig, RolloutConfig
from colearn.errors import ColearnError
from colearn.experience.evaluate import evaluate
from colearn.models.partner import Actions, Partner


@dataclass
class ModeParams:
    average: str = "probs"  # ensemble: mean of "probs" or of "logprobs" (renormalized product of experts)
    threshold: float = 0.1  # check_and_control: the checker vetoes a proposal it gives less probability than this
    top_k: int = 2  # consultative: legal actions the proposer offers
    env_map: dict[str, int] = field(default_factory=dict)  # route: env name -> index of the member that decides

    def __post_init__(self) -> None:
        if self.average not in ("probs", "logprobs"):
            raise ColearnError(f"integrate.average={self.average!r} is unknown; choose probs or logprobs")
        if not 0 <= self.threshold <= 1:
            raise ColearnError(f"integrate.threshold={self.threshold} must be a probability in [0, 1]")
        if self.top_k < 1:
            raise ColearnError(f"integrate.top_k={self.top_k} must be >= 1")


@dataclass
class Decision:
    choice: Tensor  # (batch,) index of the chosen legal action
    logprob: Tensor  # (batch,) its log-probability under the composite policy (nats)
    decider: Tensor  # (batch,) index of the member whose decision it is


# -- composite distributions: pure functions of the members' (batch, K) log-probabilities ----------


def ensemble_logprobs(logps: list[Tensor], average: str = "probs") -> Tensor:
    """Returns the ensemble's log-probabilities, (batch, K): log of the mean of the members'
    probabilities, or the log-softmax of the mean of their log-probabilities."""
    stacked = torch.stack(logps)  # (members, batch, K)
    if average == "logprobs":
        return torch.log_softmax(stacked.mean(0), dim=-1)
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(logps))))


def confidence_route(logps: list[Tensor]) -> Tensor:
    """Returns, per observation, the index of the member with the highest max-probability, (batch,)."""
    return torch.stack([lp.max(-1).values for lp in logps]).argmax(0)  # ties go to the first member


def routed_logprobs(logps: list[Tensor], route: Tensor) -> Tensor:
    """Returns each row's log-probabilities from the member `route` names, (batch, K)."""
    stacked = torch.stack(logps)  # (members, batch, K)
    return stacked[route, torch.arange(route.numel())]


def accepted_logprobs(checker: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Returns (vetoed, q): vetoed marks the actions the checker gives < threshold, (batch, K), and q is
    the checker's distribution over the actions it accepts (over all actions in a row where it accepts
    none), (batch, K) log-probabilities."""
    vetoed = checker.exp() < threshold
    support = torch.where(vetoed.all(-1, keepdim=True), torch.zeros_like(vetoed), vetoed)
    q = torch.log_softmax(checker.masked_fill(support, float("-inf")), dim=-1)
    return vetoed, q


def check_and_control_logprobs(proposer: Tensor, checker: Tensor, threshold: float) -> Tensor:
    """Returns the log-probabilities of the two-stage check-and-control policy, (batch, K):
    P(a) = p0(a)·[a not vetoed] + V·q(a), V = proposer mass on vetoed actions."""
    vetoed, q = accepted_logprobs(checker, threshold)
    p0 = proposer.exp()
    vetoed_mass = (p0 * vetoed).sum(-1, keepdim=True)  # (batch, 1)
    return torch.log(p0 * ~vetoed + vetoed_mass * q.exp())


def consultative_logprobs(proposer: Tensor, chooser: Tensor, top_k: int) -> Tensor:
    """Returns the chooser's log-probabilities renormalized over the proposer's top_k actions, (batch, K)."""
    k = min(top_k, proposer.shape[-1])
    offered = torch.zeros_like(proposer, dtype=torch.bool).scatter(-1, proposer.topk(k, dim=-1).indices, True)
    return torch.log_softmax(chooser.masked_fill(~offered, float("-inf")), dim=-1)


# -- modes: decisions ---------------------------------------------------------------------------------


def pick(logp: Tensor, greedy: bool, generator: torch.Generator) -> Tensor:
    """Returns the argmax (greedy) or a sample of each row of a (batch, K) log-probability matrix, (batch,)."""
    if greedy:
        return logp.argmax(-1)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)


def at(logp: Tensor, index: Tensor) -> Tensor:
    """Returns logp[i, index[i]] for each row, (batch,)."""
    return logp.gather(1, index[:, None]).squeeze(1)


def routed(logps: list[Tensor], by: Tensor, greedy: bool, gen: torch.Generator) -> Decision:
    composite = routed_logprobs(logps, by)
    choice = pick(composite, greedy, gen)
    return Decision(choice, at(composite, choice), by)


def expert_route(logps: list[Tensor], p: ModeParams, env: str | None) -> Tensor:
    """Returns, per observation, the index of the member that decides under `route`: the env's expert, or in an env
    without one the surer member, (batch,)."""
    if env is not None and env in p.env_map:
        return torch.full((logps[0].shape[0],), p.env_map[env], dtype=torch.long)
    return confidence_route(logps)


def route(logps: list[Tensor], p: ModeParams, env: str | None, greedy: bool, gen: torch.Generator) -> Decision:
    """Distributed responsibility: the env's expert decides; in an env without one, the surer member."""
    return routed(logps, expert_route(logps, p, env), greedy, gen)


def route_by_confidence(
    logps: list[Tensor], p: ModeParams, env: str | None, greedy: bool, gen: torch.Generator
) -> Decision:
    """A router over observations alone: the member with the higher max-probability decides."""
    return routed(logps, confidence_route(logps), greedy, gen)


def ensemble(logps: list[Tensor], p: ModeParams, env: str | None, greedy: bool, gen: torch.Generator) -> Decision:
    """Consensus: act from the averaged distribution."""
    composite = ensemble_logprobs(logps, p.average)
    choice = pick(composite, greedy, gen)
    votes = torch.stack([at(lp, choice) for lp in logps])  # (members, batch)
    # the "decider" of a consensus: the member that gave the chosen action the most probability
    return Decision(choice, at(composite, choice), votes.argmax(0))


def check_and_control(
    logps: list[Tensor], p: ModeParams, env: str | None, greedy: bool, gen: torch.Generator
) -> Decision:
    """Member 0 proposes (samples, or its argmax when greedy); member 1 vetoes a proposal it gives less than
    `threshold` and then decides (samples, or its argmax) among the actions it accepts."""
    proposer, checker = logps
    vetoed, q = accepted_logprobs(checker, p.threshold)
    proposal = pick(proposer, greedy, gen)
    veto = at(vetoed, proposal)  # (batch,)
    choice = torch.where(veto, pick(q, greedy, gen), proposal)
    composite = check_and_control_logprobs(proposer, checker, p.threshold)
    return Decision(choice, at(composite, choice), veto.long())


def consultative(logps: list[Tensor], p: ModeParams, env: str | None, greedy: bool, gen: torch.Generator) -> Decision:
    """Member 0 offers its top_k actions; member 1 picks among them by its own probabilities."""
    proposer, chooser = logps
    composite = consultative_logprobs(proposer, chooser, p.top_k)
    choice = pick(composite, greedy, gen)
    return Decision(choice, at(composite, choice), torch.ones_like(choice))


# (member log-probs (batch, K) each, params, env or None, greedy, generator) -> decision
ModeFn = Callable[[list[Tensor], ModeParams, str | None, bool, torch.Generator], Decision]

MODES: dict[str, ModeFn] = {
    "route": route,
    "route_confidence": route_by_confidence,
    "ensemble": ensemble,
    "check_and_control": check_and_control,
    "consultative": consultative,
}
# (member log-probs (batch, K) each, params, env or None) -> the mode's sampling distribution, (batch, K) log-probs
CompositeFn = Callable[[list[Tensor], ModeParams, str | None], Tensor]

COMPOSITES: dict[str, CompositeFn] = {
    "route": lambda logps, p, env: routed_logprobs(logps, expert_route(logps, p, env)),
    "route_confidence": lambda logps, p, env: routed_logprobs(logps, confidence_route(logps)),
    "ensemble": lambda logps, p, env: ensemble_logprobs(logps, p.average),
    "check_and_control": lambda logps, p, env: check_and_control_logprobs(*logps, p.threshold),
    "consultative": lambda logps, p, env: consultative_logprobs(*logps, p.top_k),
}
PAIR_ONLY = ("check_and_control", "consultative")  # modes with a proposer (member 0) and a checker (member 1)


def get_mode(name: str) -> ModeFn:
    """Returns the decision function of integration mode `name`."""
    if name not in MODES:
        raise ColearnError(f"integrate mode {name!r} is unknown; choose one of {sorted(MODES)}")
    return MODES[name]


# -- the composite policy -------------------------------------------------------------------------------


@dataclass
class Integrated:
    """Members acting as one policy under `mode`; usable wherever a Partner acts."""

    mode: str
    members: list[Partner]
    params: ModeParams = field(default_factory=ModeParams)
    name: str = ""  # label in step records and metrics; defaults to the mode
    env: str | None = None  # env being acted in, when the caller knows it (route reads env_map with it)
    decisions: list[float] = field(default_factory=list)  # actions decided so far by each member (expected, when
    # scored exactly)

    def __post_init__(self) -> None:
        self._decide = get_mode(self.mode)
        if self.mode in PAIR_ONLY and len(self.members) != 2:
            raise ColearnError(
                f"integrate mode {self.mode!r} needs 2 members (proposer, checker), "
                f"got {len(self.members)}: {[m.name for m in self.members]}"
            )
        if not self.members:
            raise ColearnError(f"integrate mode {self.mode!r} needs at least one member")
        self.name = self.name or self.mode
        self.decisions = self.decisions or [0] * len(self.members)

    @property
    def envs(self) -> list[str]:
        return list(dict.fromkeys(e for m in self.members for e in m.envs))

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def prompt_ids(self, observations: list[str]) -> list[list[int]]:
        """Returns member 0's prompt token ids (members descend from one ancestor and share its tokenizer)."""
        return self.members[0].prompt_ids(observations)

    def in_env(self, env: str) -> Integrated:
        """Returns this policy told which env it acts in (sharing members and decision counts)."""
        bound = copy.copy(self)
        bound.env = env
        return bound

    @torch.no_grad()
    def act(
        self,
        observations: list[str],
        legal: list[str] | None,
        greedy: bool,
        generator: torch.Generator,
        temperature: float = 1.0,
        max_new_tokens: int = 8,
        cache: dict | None = None,
        charset: str | None = None,
    ) -> Actions:
        """Returns one action per observation, chosen by the mode (see the module docstring for log-probs).
        `cache` holds each member's scored observations while the weights are fixed (`Partner.action_logprobs`)."""
        if not legal:
            return self._act_alone(observations, greedy, generator, temperature, max_new_tokens, charset)
        cache = {} if cache is None else cache
        logps = [
            m.action_logprobs(observations, legal, temperature, cache.setdefault(i, {})).cpu()
            for i, m in enumerate(self.members)
        ]
        d = self._decide(logps, self.params, self.env, greedy, generator)
        for m in d.decider.tolist():
            self.decisions[m] += 1
        picks, by = d.choice.tolist(), d.decider.tolist()
        ids = [self.members[m].action_ids(legal)[c] for c, m in zip(picks, by)]
        return Actions([legal[c] for c in picks], ids, d.logprob.tolist())

    @torch.no_grad()
    def policy_probs(
        self, observations: list[str], legal: list[str], temperature: float = 1.0, greedy: bool = False
    ) -> Tensor:
        """Returns the probability `act` gives each legal action per observation, (observations, K): the mode's
        sampling distribution, or one-hot on its greedy decision (what exact evaluation runs through an env's
        table)."""
        logps = self._member_logprobs(observations, legal, temperature)
        if greedy:
            return torch.nn.functional.one_hot(self._greedy(logps).choice, len(legal)).float()
        return COMPOSITES[self.mode](logps, self.params, self.env).exp()

    def count_decisions(
        self, observations: list[str], legal: list[str], temperature: float, weights: Sequence[float]
    ) -> None:
        """Adds each observation's weight (its expected visits, from exact evaluation) to the decisions of the member
        deciding there greedily."""
        deciders = self._greedy(self._member_logprobs(observations, legal, temperature)).decider.tolist()
        for m, w in zip(deciders, weights):
            self.decisions[m] += float(w)

    def _member_logprobs(self, observations: list[str], legal: list[str], temperature: float) -> list[Tensor]:
        return [m.action_logprobs(observations, legal, temperature).cpu() for m in self.members]

    def _greedy(self, logps: list[Tensor]) -> Decision:
        return self._decide(logps, self.params, self.env, True, torch.Generator())  # greedy: draws nothing

    def _act_alone(self, observations, greedy, generator, temperature, max_new_tokens, charset) -> Actions:
        """Generate mode: the env's expert (route) or member 0 acts alone."""
        index = self.params.env_map.get(self.env, 0) if self.mode == "route" and self.env else 0
        self.decisions[index] += len(observations)
        return self.members[index].act(
            observations, None, greedy, generator, temperature, max_new_tokens, charset=charset
        )


def env_map_of(members: list[Partner]) -> dict[str, int]:
    """Returns {env: index of the first member that acts in it}: each env's expert."""
    mapping: dict[str, int] = {}
    for i, m in enumerate(members):
        for env in m.envs:
            mapping.setdefault(env, i)
    return mapping


def evaluate_modes(
    members: list[Partner],
    suite: list[EnvSpec],
    modes: list[str],
    eval_cfg: EvalConfig,
    rollout_cfg: RolloutConfig,
    params: ModeParams | None = None,
) -> list[dict[str, Any]]:
    """Returns one record per (mode, env, evaluated policy) of the members integrated under each mode,
    evaluated by `evaluate.evaluate` on its fixed seeds: fields mode, members, env, policy, mean_return,
    success, optimal, normalized, episodes, the namespaced `integrate/<policy>/<mode>/<env>` (normalized
    return) and, on each mode's first record, `integrate/share/<mode>/<member>` (fraction of that mode's
    decisions each member made).

    Each env is evaluated with the policy told its name, so `route` sends it to its expert (`env_map`,
    by default each env's first member acting in it). Pair-only modes (check_and_control, consultative)
    are skipped unless there are exactly two members."""
    params = params or ModeParams()
    if not params.env_map:
        params = ModeParams(params.average, params.threshold, params.top_k, env_map_of(members))
    records = []
    for mode in [m for m in modes if len(members) == 2 or m not in PAIR_ONLY]:
        policy = Integrated(mode, members, params)
        scores = [s for spec in suite for s in evaluate(policy.in_env(spec.name), [spec], eval_cfg, rollout_cfg)]
        total = sum(policy.decisions) or 1
        shares = {f"integrate/share/{mode}/{m.name}": n / total for m, n in zip(members, policy.decisions)}
        for i, s in enumerate(scores):  # the shares are the mode's, not an env's: on its first record only
            records.append(
                {
                    "mode": mode,
                    "members": [m.name for m in members],
                    **s.as_dict(),
                    f"integrate/{s.policy}/{mode}/{s.env}": s.normalized,
                    **(shares if i == 0 else {}),
                }
            )
    return records
