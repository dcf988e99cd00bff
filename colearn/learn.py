"""Learning by experience: distillation of selected successes plus RL on own and the partner's steps.

One gradient step mixes three kinds of rows:
- own: clipped policy gradient against the stored behaviour log-probability (PPO/GRPO style),
- peer: the partner's steps, weighted by the truncated ratio pi_self / pi_partner (SEAC, Christianos et al. 2020),
- distill: negative log-likelihood of the action tokens of selected successful steps (rejection-sampling
  fine-tuning / STaR), optionally with a KL toward the partner's action distribution (deep mutual learning).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from colearn.config import LearnConfig
from colearn.partner import Partner
from colearn.policy import continuation_stats, entropy_of, last_logits, legal_action_logprobs

log = logging.getLogger(__name__)


def group_advantages(returns: torch.Tensor, groups: list[Any], eps: float = 1e-6) -> torch.Tensor:
    """Returns (return - group mean) / (group std + eps) per entry, 0 for groups without variance, (n,)."""
    out = torch.zeros_like(returns)
    members: dict[Any, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    for idx in members.values():
        r = returns[idx]
        if len(idx) > 1 and r.std() > eps:
            out[idx] = (r - r.mean()) / (r.std() + eps)
    return out


def step_advantages(rows: list[dict[str, Any]], mode: str) -> list[float]:
    """Returns one advantage per step record.

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
    members: dict[Any, list[int]] = defaultdict(list)
    for i, s in enumerate(states):
        members[s].append(i)
    for idx in members.values():
        baseline[idx] = returns[idx].mean()
    adv = returns - baseline
    std = adv.std() if len(adv) > 1 else torch.tensor(0.0)
    return (adv / std).tolist() if std > 1e-8 else [0.0] * len(rows)


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
    """Returns the steps worth imitating: of successful episodes, or of the top fraction by episode return."""
    if how == "success":
        return [r for r in rows if r["success"] and not r["invalid"]]
    returns = sorted({(r["episode_id"], r["episode_return"]) for r in rows}, key=lambda x: -x[1])
    keep = {e for e, _ in returns[: max(1, math.ceil(len(returns) * top_fraction))]}
    return [r for r in rows if r["episode_id"] in keep and not r["invalid"]]


def row_logprobs(
    partner: Partner, rows: list[dict[str, Any]], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (policy log-prob, policy entropy, token log-likelihood) of each row's action, each (n,).

    The policy of a constrained row is the distribution over its legal actions; of a generated row,
    the model's distribution over token sequences; both at the behaviour policy's `temperature`, so
    they equal the stored behaviour log-probs for unchanged weights. The token log-likelihood (the
    distillation target) is always at temperature 1."""
    n = len(rows)
    device = partner.device
    policy_lp, entropy, token_lp = (torch.zeros(n, device=device) for _ in range(3))
    by_legal: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_legal[tuple(r["legal_actions"])].append(i)
    pad = partner.tokenizer.pad_token_id
    for legal, idx in by_legal.items():
        prompts = [list(rows[i]["prompt_ids"]) for i in idx]
        conts = [list(rows[i]["action_ids"]) for i in idx]
        index = torch.tensor(idx, device=device)
        action_ids = partner.action_ids(list(legal)) if legal else []
        if legal and all(len(a) == 1 for a in action_ids):
            lp_full, lp_legal = _single_token_logprobs(partner, prompts, action_ids, pad, temperature)
            chosen = torch.tensor([list(legal).index(rows[i]["action"]) for i in idx], device=device)
            policy_lp = policy_lp.index_put((index,), lp_legal.gather(1, chosen[:, None]).squeeze(1))
            entropy = entropy.index_put((index,), entropy_of(lp_legal))
            tokens = torch.tensor([c[0] for c in conts], device=device)
            token_lp = token_lp.index_put((index,), lp_full.gather(1, tokens[:, None]).squeeze(1))
        else:
            lp, ent = continuation_stats(partner.model, prompts, conts, pad, temperature)
            policy_lp = policy_lp.index_put((index,), lp)
            entropy = entropy.index_put((index,), ent)
            if temperature != 1.0:
                lp, _ = continuation_stats(partner.model, prompts, conts, pad)
            token_lp = token_lp.index_put((index,), lp)
    return policy_lp, entropy, token_lp


def _single_token_logprobs(partner: Partner, prompts, action_ids, pad, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    # one forward pass serves both the full-vocabulary SFT term and the policy over legal actions
    logits = last_logits(partner.model, prompts, pad)  # (batch, vocab)
    legal_index = torch.tensor([a[0] for a in action_ids], device=logits.device)
    return F.log_softmax(logits, -1), F.log_softmax(logits[:, legal_index] / temperature, -1)


def optimizer_for(partner: Partner, cfg: LearnConfig) -> torch.optim.Optimizer:
    """Returns the partner's AdamW optimizer, creating it on first use (its state persists across rounds)."""
    if partner.optimizer is None:
        params = [p for p in partner.model.parameters() if p.requires_grad]
        partner.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return partner.optimizer


def learn(
    partner: Partner,
    own: list[dict[str, Any]],
    peer: list[dict[str, Any]],
    distill: list[dict[str, Any]],
    cfg: LearnConfig,
    seed: int,
    teacher: Partner | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Updates the partner in place on its own steps (RL), the partner's steps (importance-weighted RL)
    and the distillation set (SFT on action tokens); returns the round's training statistics."""
    own_adv = step_advantages(own, cfg.advantage) if own else []
    peer_adv = step_advantages(peer, cfg.advantage) if peer else []
    items = [("own", r, a) for r, a in zip(own, own_adv) if cfg.rl_coef and a != 0.0]
    items += [("peer", r, a) for r, a in zip(peer, peer_adv) if cfg.peer_rl_coef and a != 0.0]
    items += [("distill", r, 0.0) for r in distill] if cfg.distill_coef else []
    stats = {"loss/rl": 0.0, "loss/peer_rl": 0.0, "loss/distill": 0.0, "loss/kl": 0.0, "entropy": 0.0,
             "learn/updates": 0, "learn/skipped_nonfinite": 0, "learn/rows": len(items),
             "learn/distill_rows": len(distill), "learn/reward_std": _reward_std(own)}
    if not items:
        return stats
    optimizer = optimizer_for(partner, cfg)
    partner.model.train()
    order = random.Random(seed)
    for _ in range(cfg.epochs):
        order.shuffle(items)
        for start in range(0, len(items), cfg.batch_size):
            batch = items[start : start + cfg.batch_size]
            loss, parts = batch_loss(partner, batch, cfg, teacher, temperature)
            if not torch.isfinite(loss):
                stats["learn/skipped_nonfinite"] += 1
                log.warning("partner %s: non-finite loss %s, update skipped", partner.name, loss.item())
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.max_grad_norm)
            optimizer.step()
            stats["learn/updates"] += 1
            for k, v in parts.items():
                stats[k] += v
    partner.model.eval()
    for k in ("loss/rl", "loss/peer_rl", "loss/distill", "loss/kl", "entropy"):
        stats[k] /= max(stats["learn/updates"], 1)
    return stats


def batch_loss(
    partner: Partner,
    batch: list[tuple[str, dict[str, Any], float]],
    cfg: LearnConfig,
    teacher: Partner | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Returns the mixed loss of one minibatch and its parts (as floats)."""
    rows = [r for _, r, _ in batch]
    kinds = [k for k, _, _ in batch]
    device = partner.device
    policy_lp, entropy, token_lp = row_logprobs(partner, rows, temperature)
    adv = torch.tensor([a for _, _, a in batch], device=device, dtype=torch.float32)
    behaviour = torch.tensor([r["logprob"] for r in rows], device=device, dtype=torch.float32)
    mask = {k: torch.tensor([x == k for x in kinds], device=device) for k in ("own", "peer", "distill")}
    count = {k: m.sum().clamp(min=1) for k, m in mask.items()}  # each term is a mean over its own rows
    rl = (clipped_pg_loss(policy_lp, behaviour, adv, cfg.clip_eps) * mask["own"]).sum() / count["own"]
    peer_rl = (peer_pg_loss(policy_lp, behaviour, adv, cfg.peer_ratio_cap) * mask["peer"]).sum() / count["peer"]
    distill = -(token_lp * mask["distill"]).sum() / count["distill"]
    acting = mask["own"] | mask["peer"]
    ent = (entropy * acting).sum() / acting.sum().clamp(min=1)
    kl = mutual_kl(partner, teacher, [r for r, m in zip(rows, mask["distill"].tolist()) if m]) / count["distill"]
    loss = cfg.rl_coef * rl + cfg.peer_rl_coef * peer_rl + cfg.distill_coef * distill - cfg.entropy_coef * ent
    loss = loss + cfg.mutual_kl_coef * kl
    parts = {k: v.item() for k, v in
             {"loss/rl": rl, "loss/peer_rl": peer_rl, "loss/distill": distill, "loss/kl": kl, "entropy": ent}.items()}
    return loss, parts


def mutual_kl(partner: Partner, teacher: Partner | None, rows: list[dict[str, Any]]) -> torch.Tensor:
    """Returns the summed KL(teacher || partner) over the legal actions of constrained rows (0 without a teacher)."""
    rows = [r for r in rows if r["legal_actions"]]
    if teacher is None or not rows:
        return torch.zeros((), device=partner.device)
    total = torch.zeros((), device=partner.device)
    by_legal: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_legal[tuple(r["legal_actions"])].append(r)
    for legal, group in by_legal.items():
        prompts = [list(r["prompt_ids"]) for r in group]
        mine = legal_action_logprobs(partner.model, prompts, partner.action_ids(list(legal)),
                                     partner.tokenizer.pad_token_id)
        with torch.no_grad():
            theirs = legal_action_logprobs(teacher.model, prompts, teacher.action_ids(list(legal)),
                                           teacher.tokenizer.pad_token_id)
        total = total + (theirs.exp() * (theirs - mine)).sum()
    return total


def _reward_std(rows: list[dict[str, Any]]) -> float:
    returns = [r["episode_return"] for r in rows if r["step"] == 0]
    if len(returns) < 2:
        return 0.0
    return float(torch.tensor(returns).std())
