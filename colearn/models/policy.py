"""The policy a causal LM defines over actions: log-probabilities and entropies of actions given prompts.

Acting and learning both go through these functions, so a behaviour log-probability stored at
rollout time is the same number the learner recomputes for unchanged weights.
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from trl.trainer.utils import entropy_from_logits, selective_log_softmax


def right_padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ids, attention_mask), both (batch, longest), padded on the right so positions stay 0.."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def last_logits(model: torch.nn.Module, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Returns the next-token logits after each prompt, (batch, vocab), in float32."""
    return last_outputs(model, prompts, pad_id, hidden=False)[0]


def last_outputs(
    model: torch.nn.Module, prompts: list[list[int]], pad_id: int, hidden: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (next-token logits, final hidden state) at the last token of each prompt, (batch, vocab) and
    (batch, hidden), in float32 (the hidden state None unless asked): one forward pass serves the policy and a
    value head."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts])
    longest = int(lengths.max())
    mask = torch.arange(longest) >= longest - lengths[:, None]  # left-padded: every prompt ends at the last column
    tokens = torch.from_numpy(np.fromiter(chain.from_iterable(prompts), dtype=np.int64, count=int(lengths.sum())))
    ids = torch.full(mask.shape, pad_id, dtype=torch.long).masked_scatter(mask, tokens)  # row-major: rows in order
    mask = mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # pads take no position: same numbers as unpadded
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=1,
        use_cache=False,
        output_hidden_states=hidden,
    )  # no KV cache: nothing is generated
    return out.logits[:, -1].float(), out.hidden_states[-1][:, -1].float() if hidden else None


def continuation_stats(
    model: torch.nn.Module,
    prompts: list[list[int]],
    conts: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    allowed: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (log-prob, mean token entropy), each (batch,), of each continuation given its prompt."""
    logps, entropy, _ = continuation_outputs(model, prompts, conts, pad_id, temperature, hidden=False, allowed=allowed)
    return logps, entropy


def continuation_outputs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    conts: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    hidden: bool = True,
    allowed: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (log-prob, mean token entropy), each (batch,), of each continuation given its prompt, and the
    final hidden state at each prompt's last token, (batch, hidden) (causal: it has not seen the continuation;
    None unless asked). With `allowed`, the distribution at every step is renormalized over those token ids
    (the tokens a generating policy was held to)."""
    device = next(model.parameters()).device
    ids, mask = right_padded([p + c for p, c in zip(prompts, conts)], pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False)  # nothing follows
    logits = held_to(out.logits[:, :-1].float(), allowed) / temperature  # (batch, len-1, vocab)
    targets = ids[:, 1:]
    cont_mask = torch.zeros_like(targets, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        cont_mask[i, len(p) - 1 : len(p) - 1 + len(c)] = True  # position t predicts token t+1
    token_logps = selective_log_softmax(logits, targets) * cont_mask  # (batch, len-1)
    token_ent = entropy_from_logits(logits) * cont_mask
    n = cont_mask.sum(1).clamp(min=1)
    if not hidden:
        return token_logps.sum(1), token_ent.sum(1) / n, None
    last_prompt = torch.tensor([len(p) - 1 for p in prompts], device=device)
    states = out.hidden_states[-1][torch.arange(len(prompts), device=device), last_prompt].float()  # (batch, hidden)
    return token_logps.sum(1), token_ent.sum(1) / n, states


def held_to(logits: torch.Tensor, allowed: list[int] | None) -> torch.Tensor:
    """Returns `logits` with every token outside `allowed` at the dtype's lowest value (unchanged without it):
    finite, so that entropies stay 0 * x = 0 for the excluded tokens."""
    if allowed is None:
        return logits
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.tensor(allowed, device=logits.device)] = True
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def legal_action_outputs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    action_ids: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    hidden: bool = False,
    likelihoods: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns log pi(a | prompt) renormalized over the K legal actions at `temperature`, (batch, K); with
    `likelihoods`, each action's token log-likelihood over the whole vocabulary at temperature 1 (what distillation
    maximizes), (batch, K); with `hidden`, the final hidden state at each prompt's last token, (batch, hidden).

    Single-token actions (colearn's own tokenizers) need one forward pass; multi-token actions
    (any other tokenizer) are scored as batch*K continuations.
    """
    if all(len(a) == 1 for a in action_ids):
        logits, states = last_outputs(model, prompts, pad_id, hidden=hidden)  # (batch, vocab)
        index = torch.tensor([a[0] for a in action_ids], device=logits.device)
        plain = F.log_softmax(logits, dim=-1)[:, index] if likelihoods else None
        return F.log_softmax(logits[:, index] / temperature, dim=-1), plain, states
    k = len(action_ids)
    rep_prompts = [p for p in prompts for _ in range(k)]
    rep_conts = [a for _ in prompts for a in action_ids]
    seq_logps, _, states = continuation_outputs(model, rep_prompts, rep_conts, pad_id, temperature, hidden)
    plain = None
    if likelihoods:
        plain = seq_logps if temperature == 1.0 else continuation_stats(model, rep_prompts, rep_conts, pad_id)[0]
        plain = plain.view(len(prompts), k)
    if hidden:  # causal: the prompt's last state has not seen the action, so it is the same for all K
        states = states.view(len(prompts), k, -1)[:, 0]
    return F.log_softmax(seq_logps.view(len(prompts), k), dim=-1), plain, states


def legal_action_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    action_ids: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Returns log pi(a | prompt) renormalized over the K legal actions, (batch, K) (`legal_action_outputs`)."""
    return legal_action_outputs(model, prompts, action_ids, pad_id, temperature)[0]


def entropy_of(logps: torch.Tensor) -> torch.Tensor:
    """Returns the entropy (nats) of each row of a log-probability matrix, (batch,)."""
    return -(logps.exp() * logps).sum(-1)
