"""Learning by experience: distillation of selected successes plus RL on own and the partner's steps.

One gradient step mixes three kinds of rows:
- own: clipped policy gradient against the stored behaviour log-probability (PPO/GRPO style),
- peer: the partner's steps, weighted by the truncated ratio pi_self / pi_partner (SEAC, Christianos et al. 2020),
- distill: negative log-likelihood of the action tokens of selected successful steps (rejection-sampling
  fine-tuning / STaR), optionally with a KL toward the partner's action distribution (deep mutual learning;
  with several partners, the mean KL toward each of them).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from colearn.config import LearnConfig
from colearn.models.partner import Partner, new_value_head
from colearn.models.policy import (
    continuation_outputs,
    continuation_stats,
    entropy_of,
    legal_action_logprobs,
    legal_action_outputs,
)

log = logging.getLogger(__name__)


def indices_by(keys: list[Any]) -> dict[Any, list[int]]:
    """Returns {key: the positions it has in `keys`}, keys in order of first appearance."""
    positions: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        positions[key].append(i)
    return positions


def group_advantages(returns: torch.Tensor, groups: list[Any], eps: float = 1e-6) -> torch.Tensor:
    """Returns (return - group mean) / (group std + eps) per entry, 0 for groups without variance, (n,)."""
    out = torch.zeros_like(returns)
    for idx in indices_by(groups).values():
        r = returns[idx]
        if len(idx) > 1 and r.std() > eps:
            out[idx] = (r - r.mean()) / (r.std() + eps)
    return out


def step_advantages(rows: list[dict[str, Any]], mode: str) -> list[float]:
    """Returns one advantage per step record, for the critic-free modes.

    mode="episode": every step gets its episode's discounted return normalized within its group
    (episodes with the same partner, env, round and reset seed: GRPO).
    mode="return_to_go": each step's discounted return-to-go minus the mean return-to-go of the steps
    taken from the same observation (a Monte-Carlo state-value baseline), over the batch's std. This
    credits each action, so a wasted step on a successful path is not reinforced.
    """
    if mode == "episode":
        firsts = [r for r in rows if r["step"] == 0]
        keys = [(r["partner"], r["env"], r["generation"], r["round"], r["seed"]) for r in firsts]
        start_returns = torch.tensor([r["return_to_go"] for r in firsts], dtype=torch.float64)
        by_episode = dict(zip((r["episode_id"] for r in firsts), group_advantages(start_returns, keys).tolist()))
        return [by_episode[r["episode_id"]] for r in rows]
    returns = torch.tensor([r["return_to_go"] for r in rows], dtype=torch.float64)
    states = [(r["env"], r["observation"]) for r in rows]
    baseline = torch.zeros_like(returns)
    for idx in indices_by(states).values():
        baseline[idx] = returns[idx].mean()
    adv = returns - baseline
    std = adv.std() if len(adv) > 1 else torch.tensor(0.0)
    return (adv / std).tolist() if std > 1e-8 else [0.0] * len(rows)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (advantages, value targets) of one finished episode by generalized advantage estimation
    (Schulman et al. 2016), each (steps,). The episode's end, terminal or at the time limit, has value 0:
    the task is finite-horizon, so no return is left to bootstrap."""
    next_values = torch.cat([values[1:], values.new_zeros(1)])
    deltas = rewards + gamma * next_values - values  # (steps,) TD errors
    adv = torch.zeros_like(deltas)
    running = 0.0
    for t in reversed(range(len(deltas))):
        running = deltas[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + values


def episode_spans(rows: list[dict[str, Any]]) -> list[range]:
    """Returns the index range of each episode in `rows` (an episode's steps are contiguous, in order)."""
    spans, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i]["episode_id"] != rows[start]["episode_id"]:
            spans.append(range(start, i))
            start = i
    return spans


def gae_advantages(
    rows: list[dict[str, Any]], values: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (advantages, value targets) of every step record, (n,), by GAE within each episode."""
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    values = values.double()
    adv, targets = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for span in episode_spans(rows):
        idx = torch.tensor(span)
        adv[idx], targets[idx] = gae(rewards[idx], values[idx], gamma, lam)
    return adv, targets


def normalized(adv: torch.Tensor, how: str = "mean_std", floor: float = 0.0) -> torch.Tensor:
    """Returns the advantages divided by their std, or by `floor` where the std is smaller ("std"), also shifted
    to mean 0 first ("mean_std"), or as they are ("none"); unchanged when they do not vary. Dividing keeps each
    advantage's sign, so a round where most steps succeed still reinforces them; centering turns the rare failures
    of such a round into large negative advantages; the floor keeps a round whose advantages are only the value
    head's noise from being scaled up to the size of real ones (docs/learning.md)."""
    if how == "none" or len(adv) < 2 or adv.std() < 1e-8:
        return adv
    scale = adv.std().clamp(min=floor)
    return (adv - adv.mean()) / scale if how == "mean_std" else adv / scale


def clipped_pg_loss(logp: torch.Tensor, behaviour: torch.Tensor, adv: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Returns the PPO clipped surrogate loss per row, (n,)."""
    ratio = torch.exp(logp - behaviour)
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def peer_pg_loss(logp: torch.Tensor, peer_behaviour: torch.Tensor, adv: torch.Tensor, cap: float) -> torch.Tensor:
    """Returns the shared-experience policy-gradient loss per row, (n,): the partner's step weighted by
    min(pi_self / pi_partner, cap), the weight held constant (SEAC)."""
    weight = torch.exp(logp.detach() - peer_behaviour).clamp(max=cap)
    return -weight * adv * logp


def select_for_distillation(rows: list[dict[str, Any]], how: str, top_fraction: float) -> list[dict[str, Any]]:
    """Returns the steps worth imitating: of successful episodes, or of the top fraction by episode return,
    each episode without its loops (`loop_free`)."""
    if how == "success":
        keep = {r["episode_id"] for r in rows if r["success"]}
    else:
        returns = sorted({(r["episode_id"], r["episode_return"]) for r in rows}, key=lambda x: -x[1])
        keep = {e for e, _ in returns[: max(1, math.ceil(len(returns) * top_fraction))]}
    chosen = [r for r in rows if r["episode_id"] in keep]
    return [r for span in episode_spans(chosen) for r in loop_free([chosen[i] for i in span]) if not r["invalid"]]


def loop_free(episode: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Returns the episode's steps with every cycle cut out: when an observation comes back, the steps taken since
    its first visit are dropped. A successful episode of a sampling policy wanders (bumps into walls, goes back
    and forth); imitating those steps teaches the wandering, and a greedy policy that learned it loops forever."""
    path: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for r in episode:
        if r["observation"] in seen:
            del path[seen[r["observation"]] :]
            seen = {p["observation"]: i for i, p in enumerate(path)}
        seen[r["observation"]] = len(path)
        path.append(r)
    return path


def row_logprobs(
    partner: Partner, rows: list[dict[str, Any]], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (policy log-prob, policy entropy, token log-likelihood) of each row's action, each (n,).

    The policy of a constrained row is the distribution over its legal actions; of a generated row,
    the model's distribution over token sequences; both at the behaviour policy's `temperature`, so
    they equal the stored behaviour log-probs for unchanged weights. The token log-likelihood (the
    distillation target) is always at temperature 1."""
    policy_lp, entropy, token_lp, _ = row_outputs(partner, rows, temperature, values=False)
    return policy_lp, entropy, token_lp


def row_outputs(
    partner: Partner, rows: list[dict[str, Any]], temperature: float = 1.0, values: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns `row_logprobs`'s three numbers per row and, with `values`, the value head's state value of each
    row's prompt, (n,). The model runs once per distinct prompt (or prompt and action): envs repeat states,
    so a batch has far fewer of them than rows, and the rows sharing one share its outputs and gradients."""
    n = len(rows)
    device = partner.device
    policy_lp, entropy, token_lp, value = (torch.zeros(n, device=device) for _ in range(4))
    by_legal = indices_by([(tuple(r["legal_actions"]), r.get("action_charset", "")) for r in rows])
    pad = partner.tokenizer.pad_token_id
    for (legal, charset), idx in by_legal.items():
        index = torch.tensor(idx, device=device)
        if legal:  # constrained: the policy is over the K legal actions, as `Partner.act` draws from it
            distinct, inverse = _distinct([tuple(rows[i]["prompt_ids"]) for i in idx], device)
            action_ids = partner.action_ids(list(legal))
            with partner.autocast():
                lp_legal, lp_tokens, hidden = legal_action_outputs(
                    partner.model, [list(p) for p in distinct], action_ids, pad, temperature, values, likelihoods=True
                )
            chosen = torch.tensor([list(legal).index(rows[i]["action"]) for i in idx], device=device)
            lp_legal, lp_tokens = lp_legal[inverse], lp_tokens[inverse]  # (rows, K)
            policy_lp = policy_lp.index_put((index,), lp_legal.gather(1, chosen[:, None]).squeeze(1))
            entropy = entropy.index_put((index,), entropy_of(lp_legal))
            token_lp = token_lp.index_put((index,), lp_tokens.gather(1, chosen[:, None]).squeeze(1))
        else:
            pairs = [(tuple(rows[i]["prompt_ids"]), tuple(rows[i]["action_ids"])) for i in idx]
            distinct, inverse = _distinct(pairs, device)
            prompts, conts = [list(p) for p, _ in distinct], [list(c) for _, c in distinct]
            allowed = partner.answer_ids(charset)
            with partner.autocast():
                lp, ent, hidden = continuation_outputs(partner.model, prompts, conts, pad, temperature, values, allowed)
            policy_lp = policy_lp.index_put((index,), lp[inverse])
            entropy = entropy.index_put((index,), ent[inverse])
            if temperature != 1.0:
                with partner.autocast():
                    lp, _ = continuation_stats(partner.model, prompts, conts, pad, allowed=allowed)
            token_lp = token_lp.index_put((index,), lp[inverse])
        if values:  # outside autocast: the value head and its loss stay in float32
            value = value.index_put((index,), partner.value_head(hidden).squeeze(-1)[inverse])
    return policy_lp, entropy, token_lp, value if values else None


def _distinct(keys: list[Any], device: torch.device) -> tuple[list[Any], torch.Tensor]:
    """Returns the distinct keys in first-seen order and, per key, the index of its distinct key, (n,)."""
    position: dict[Any, int] = {}
    inverse = [position.setdefault(k, len(position)) for k in keys]
    return list(position), torch.tensor(inverse, device=device)


def state_values(partner: Partner, rows: list[dict[str, Any]], chunk: int = 0) -> torch.Tensor:
    """Returns the value head's estimate of each row's state, (n,), without gradients; `chunk` rows a forward pass
    (0: all at once)."""
    value_head_for(partner)
    size = chunk or len(rows)
    with torch.no_grad():
        chunks = [row_outputs(partner, rows[i : i + size], values=True)[3] for i in range(0, len(rows), size)]
    return torch.cat(chunks).float().cpu()


def value_head_for(partner: Partner) -> torch.nn.Linear:
    """Returns the partner's value head, creating a zero one (value 0 everywhere) on first use."""
    if partner.value_head is None:
        partner.value_head = new_value_head(partner.model.config.hidden_size, partner.device)
    return partner.value_head


def optimizer_for(partner: Partner, cfg: LearnConfig) -> torch.optim.Optimizer:
    """Returns the partner's AdamW optimizer, creating it on first use (its state persists across rounds).
    With learn.advantage=gae it also trains the value head."""
    if partner.optimizer is None:
        params = [p for p in partner.model.parameters() if p.requires_grad]
        if cfg.advantage == "gae":
            params += list(value_head_for(partner).parameters())
        partner.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return partner.optimizer


@dataclass
class Item:
    """One training record: a step, or the steps of one kind that share prompt, action, behaviour log-prob and
    the sign of their advantage, merged into one (see `merged`)."""

    kind: str  # own | peer | distill
    row: dict[str, Any]  # the first step's record
    adv: float  # the steps' summed advantage
    target: float = 0.0  # the steps' mean value target
    count: int = 1  # steps merged
    spread: float = 0.0  # sum of the squared deviations of the steps' value targets from `target`


def merged(items: list[Item]) -> list[Item]:
    """Returns the items with those of one kind, prompt, action, behaviour log-prob and advantage sign merged, in
    first-seen order. Exact, not an approximation: PPO's clipped term is a * min(r, clip(r)) for a > 0 and
    a * max(r, clip(r)) for a < 0, linear in a, as are the SEAC and distillation terms, so such steps sum to one
    term with the summed advantage; their value loss sum (v - t_i)^2 is count * (v - mean t)^2 + spread. Envs
    repeat (state, action) pairs, so a round's thousands of steps become a few hundred items."""
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        r = it.row
        key = (it.kind, tuple(r["prompt_ids"]), tuple(r["action_ids"]), r["logprob"], (it.adv > 0) - (it.adv < 0))
        groups[key].append(it)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        count = sum(it.count for it in group)
        mean = sum(it.count * it.target for it in group) / count
        spread = sum(it.spread + it.count * (it.target - mean) ** 2 for it in group)
        out.append(Item(group[0].kind, group[0].row, sum(it.adv for it in group), mean, count, spread))
    return out


def training_rows(
    partner: Partner,
    own: list[dict[str, Any]],
    peer: list[dict[str, Any]],
    distill: list[dict[str, Any]],
    cfg: LearnConfig,
    gamma: float,
) -> list[Item]:
    """Returns the round's training steps, one item each: own and peer steps with their advantages (normalized per
    kind by learn.advantage_norm) and value targets, and the distillation rows."""
    items = []
    for kind, rows, coef in (("own", own, cfg.rl_coef), ("peer", peer, cfg.peer_rl_coef)):
        if not rows or not coef:
            continue
        if cfg.advantage == "gae":
            values = state_values(partner, rows, cfg.micro_batch_size)
            adv, targets = gae_advantages(rows, values, gamma, cfg.gae_lambda)
            adv = normalized(adv, cfg.advantage_norm, cfg.advantage_floor)
            items += [Item(kind, r, a, t) for r, a, t in zip(rows, adv.tolist(), targets.tolist())]
        else:  # critic-free: a step without advantage carries no gradient, so it is left out
            items += [Item(kind, r, a) for r, a in zip(rows, step_advantages(rows, cfg.advantage)) if a != 0.0]
    if cfg.distill_coef:
        items += [Item("distill", r, 0.0) for r in distill]
    return items


def learn(
    partner: Partner,
    own: list[dict[str, Any]],
    peer: list[dict[str, Any]],
    distill: list[dict[str, Any]],
    cfg: LearnConfig,
    seed: int,
    teachers: Sequence[Partner] = (),
    temperature: float = 1.0,
    gamma: float = 1.0,
) -> dict[str, float]:
    """Updates the partner in place on its own steps (RL), the partner's steps (importance-weighted RL)
    and the distillation set (SFT on action tokens); returns the round's training statistics.
    `gamma` discounts rewards in GAE (learn.advantage=gae)."""
    items = training_rows(partner, own, peer, distill, cfg, gamma)
    stats = {
        "loss/rl": 0.0,
        "loss/peer_rl": 0.0,
        "loss/distill": 0.0,
        "loss/kl": 0.0,
        "loss/value": 0.0,
        "entropy": 0.0,
        "learn/approx_kl": 0.0,
        "learn/updates": 0,
        "learn/skipped_nonfinite": 0,
        "learn/rows": len(items),
        "learn/distill_rows": len(distill),
        "learn/reward_std": _reward_std(own),
    }
    if not items:
        return stats
    optimizer = optimizer_for(partner, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    partner.model.train()
    order = random.Random(seed)
    whole = [merged(items)] if cfg.batch_size >= len(items) else None  # one batch: merge once, no order to shuffle
    for _ in range(cfg.epochs):
        if whole is None:
            order.shuffle(items)
        batches = whole or (merged(items[i : i + cfg.batch_size]) for i in range(0, len(items), cfg.batch_size))
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            accumulate = 0 < cfg.micro_batch_size < len(batch)
            if accumulate:  # the gradients are in .grad already, the loss detached
                loss, parts = accumulated_loss(partner, batch, cfg, teachers, temperature)
            else:
                loss, parts = batch_loss(partner, batch, cfg, teachers, temperature)
            if cfg.target_kl and parts["learn/approx_kl"] > cfg.target_kl:
                stats["learn/stopped_at_kl"] = parts["learn/approx_kl"]  # the policy moved far enough this round
                break
            if not torch.isfinite(loss):
                stats["learn/skipped_nonfinite"] += 1
                log.warning("partner %s: non-finite loss %s, update skipped", partner.name, loss.item())
                optimizer.zero_grad(set_to_none=True)
                continue
            if not accumulate:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            stats["learn/updates"] += 1
            for k, v in parts.items():
                stats[k] += v
        if "learn/stopped_at_kl" in stats:
            break
    partner.model.eval()
    for k in ("loss/rl", "loss/peer_rl", "loss/distill", "loss/kl", "loss/value", "entropy", "learn/approx_kl"):
        stats[k] /= max(stats["learn/updates"], 1)
    return stats


@dataclass
class Totals:
    """What a batch's loss terms are divided by. The micro-batches of a batch (learn.micro_batch_size) divide by
    their whole batch's, so their losses, and so their gradients, add up to the batch's."""

    steps: dict[str, torch.Tensor]  # own | peer | distill: the steps of that kind (at least 1)
    acting: torch.Tensor  # own and peer steps (at least 1): the entropy bonus's
    value: torch.Tensor  # own steps plus peer steps weighted by their truncated importance ratio: the value loss's


def totals_of(n: torch.Tensor, mask: dict[str, torch.Tensor], peer_weight: torch.Tensor) -> Totals:
    """Returns the Totals of items counting `n` steps each, of the kinds `mask` marks, the peer steps' importance
    weights `peer_weight` (0 elsewhere), each (items,)."""
    acting = (mask["own"] | mask["peer"]) * n
    weight = mask["own"].float() + peer_weight
    steps = {k: (n * m).sum().clamp(min=1) for k, m in mask.items()}
    return Totals(steps, acting.sum().clamp(min=1), (weight * n).sum().clamp(min=1e-8))


def counts_and_kinds(batch: list[Item], device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the steps each item stands for, (items,), and a mask of the items of each kind, {kind: (items,)}."""
    n = torch.tensor([it.count for it in batch], device=device, dtype=torch.float32)
    return n, {k: torch.tensor([it.kind == k for it in batch], device=device) for k in ("own", "peer", "distill")}


def batch_totals(partner: Partner, batch: list[Item], cfg: LearnConfig, temperature: float = 1.0) -> Totals:
    """Returns the batch's Totals before any of it passes with gradients. The value loss's count weighs each peer step
    by the policy's importance ratio, so with a critic the peer items first pass without gradients,
    learn.micro_batch_size at a time."""
    device = partner.device
    n, mask = counts_and_kinds(batch, device)
    peer_weight = torch.zeros(len(batch), device=device)
    peers = [i for i, it in enumerate(batch) if it.kind == "peer"]
    if cfg.advantage == "gae" and peers:
        rows, size = [batch[i].row for i in peers], cfg.micro_batch_size or len(peers)
        with torch.no_grad():
            lp = torch.cat(
                [row_outputs(partner, rows[i : i + size], temperature)[0] for i in range(0, len(rows), size)]
            )
        behaviour = torch.tensor([r["logprob"] for r in rows], device=device, dtype=torch.float32)
        peer_weight[torch.tensor(peers, device=device)] = torch.exp(lp - behaviour).clamp(max=cfg.peer_ratio_cap)
    return totals_of(n, mask, peer_weight)


def accumulated_loss(
    partner: Partner,
    batch: list[Item],
    cfg: LearnConfig,
    teachers: Sequence[Partner] = (),
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Passes the batch through the model learn.micro_batch_size items at a time, adding each micro-batch's
    gradients into the parameters' .grad (gradient accumulation); returns the batch's loss (detached) and parts,
    `batch_loss`'s up to float error, as the gradients are."""
    totals = batch_totals(partner, batch, cfg, temperature)
    loss, parts = torch.zeros((), device=partner.device), defaultdict(float)
    for start in range(0, len(batch), cfg.micro_batch_size):
        micro_loss, micro_parts = batch_loss(
            partner, batch[start : start + cfg.micro_batch_size], cfg, teachers, temperature, totals
        )
        micro_loss.backward()
        loss += micro_loss.detach()
        for k, v in micro_parts.items():
            parts[k] += v
    return loss, dict(parts)


def batch_loss(
    partner: Partner,
    batch: list[Item],
    cfg: LearnConfig,
    teachers: Sequence[Partner] = (),
    temperature: float = 1.0,
    totals: Totals | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the mixed loss of one minibatch and its parts (as floats); each term is a mean over its steps, or,
    given the `totals` of a larger batch it is part of, its share of that batch's mean."""
    rows = [it.row for it in batch]
    device = partner.device
    critic = cfg.advantage == "gae"
    policy_lp, entropy, token_lp, value = row_outputs(partner, rows, temperature, values=critic)
    adv = torch.tensor([it.adv for it in batch], device=device, dtype=torch.float32)
    n, mask = counts_and_kinds(batch, device)  # steps per item, the items of each kind
    behaviour = torch.tensor([r["logprob"] for r in rows], device=device, dtype=torch.float32)
    peer_weight = torch.exp(policy_lp.detach() - behaviour).clamp(max=cfg.peer_ratio_cap) * mask["peer"]
    whole = totals or totals_of(n, mask, peer_weight)  # what each term is divided by
    steps = whole.steps
    rl = (clipped_pg_loss(policy_lp, behaviour, adv, cfg.clip_eps) * mask["own"]).sum() / steps["own"]
    peer_rl = (peer_pg_loss(policy_lp, behaviour, adv, cfg.peer_ratio_cap) * mask["peer"]).sum() / steps["peer"]
    distill = -(token_lp * n * mask["distill"]).sum() / steps["distill"]
    acting = (mask["own"] | mask["peer"]) * n
    ent = (entropy * acting).sum() / whole.acting
    distilled = mask["distill"].tolist()
    kl = (
        mutual_kl(
            partner,
            teachers,
            [r for r, m in zip(rows, distilled) if m],
            [it.count for it, m in zip(batch, distilled) if m],
        )
        / steps["distill"]
    )
    value_loss = torch.zeros((), device=device)
    if critic:  # the partner's steps count by their importance weight, as in SEAC's critic
        targets = torch.tensor([it.target for it in batch], device=device, dtype=torch.float32)
        spread = torch.tensor([it.spread for it in batch], device=device, dtype=torch.float32)
        weight = mask["own"].float() + peer_weight  # per step
        value_loss = (weight * (n * (value - targets) ** 2 + spread)).sum() / whole.value / 2
    loss = cfg.rl_coef * rl + cfg.peer_rl_coef * peer_rl + cfg.distill_coef * distill - cfg.entropy_coef * ent
    loss = loss + cfg.mutual_kl_coef * kl + cfg.value_coef * value_loss
    own_kl = approx_kl(policy_lp.detach(), behaviour, mask["own"] * n, None if totals is None else steps["own"])
    parts = {
        k: v.item()
        for k, v in {
            "loss/rl": rl,
            "loss/peer_rl": peer_rl,
            "loss/distill": distill,
            "loss/kl": kl,
            "loss/value": value_loss,
            "entropy": ent,
            "learn/approx_kl": own_kl,
        }.items()
    }
    return loss, parts


def approx_kl(
    logp: torch.Tensor, behaviour: torch.Tensor, weight: torch.Tensor, total: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns the weighted mean estimate of KL(behaviour || policy) over the rows, (r - 1) - log r with
    r = pi / pi_behaviour (Schulman's k3: unbiased, never negative), divided by `total` (default: the weights' sum,
    else that of a larger batch the rows are part of); 0 when every weight is 0."""
    log_ratio = logp - behaviour
    here = weight.sum()
    if not here:
        return torch.zeros((), device=logp.device)
    return ((log_ratio.exp() - 1 - log_ratio) * weight).sum() / (here if total is None else total)


def mutual_kl(
    partner: Partner, teachers: Sequence[Partner], rows: list[dict[str, Any]], weights: list[int]
) -> torch.Tensor:
    """Returns the weighted sum of KL(teacher || partner) over the legal actions of the constrained rows, averaged
    over the teachers (deep mutual learning with several peers; 0 without one); a row's weight is the number of
    steps it stands for."""
    if not teachers:
        return torch.zeros((), device=partner.device)
    return torch.stack([kl_to(partner, t, rows, weights) for t in teachers]).mean()


def kl_to(partner: Partner, teacher: Partner, rows: list[dict[str, Any]], weights: list[int]) -> torch.Tensor:
    """Returns the weighted sum of KL(teacher || partner) over the legal actions of the constrained rows."""
    total = torch.zeros((), device=partner.device)
    by_legal: dict[tuple[str, ...], list[tuple[dict[str, Any], int]]] = defaultdict(list)
    for r, w in zip(rows, weights):
        if r["legal_actions"]:
            by_legal[tuple(r["legal_actions"])].append((r, w))
    for legal, group in by_legal.items():
        prompts = [list(r["prompt_ids"]) for r, _ in group]
        weight = torch.tensor([w for _, w in group], device=partner.device, dtype=torch.float32)
        with partner.autocast():
            mine = legal_action_logprobs(
                partner.model, prompts, partner.action_ids(list(legal)), partner.tokenizer.pad_token_id
            )
        with torch.no_grad(), teacher.autocast():
            theirs = legal_action_logprobs(
                teacher.model, prompts, teacher.action_ids(list(legal)), teacher.tokenizer.pad_token_id
            )
        total = total + ((theirs.exp() * (theirs - mine)).sum(-1) * weight).sum()
    return total


def _reward_std(rows: list[dict[str, Any]]) -> float:
    returns = [r["episode_return"] for r in rows if r["step"] == 0]
    if len(returns) < 2:
        return 0.0
    return float(torch.tensor(returns).std())
