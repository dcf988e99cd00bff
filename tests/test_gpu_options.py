"""What a GPU run sets in config, checked on the CPU: gradient accumulation (learn.micro_batch_size) gives the
whole batch's gradients, gradient checkpointing the same gradients while recomputing activations, mixed precision
(model.autocast) acts and learns, bfloat16 weights save, load and merge without losing a LoRA change, generation
batches every live episode and reuses the KV cache, and benchmarks/gpu_smoke.py skips cleanly without CUDA."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colearn import loop
from colearn.config import EnvSpec, LearnConfig, MergeConfig, ModelConfig, RolloutConfig
from colearn.errors import ColearnError
from colearn.experience.rollout import EpisodeMeta, collect
from colearn.learning.learn import (
    Item,
    accumulated_loss,
    batch_loss,
    learn,
    row_logprobs,
    select_for_distillation,
    value_head_for,
)
from colearn.models.build import build_ancestor
from colearn.models.partner import Partner
from colearn.models.weights import dense_state
from tests.conftest import ADDITION_ID, LAKE_ID, tiny_model_config

LINE = EnvSpec(LAKE_ID, name="Line", kwargs={"desc": ["SFG"]})  # "right" twice reaches the goal
SMALL_LAKE = EnvSpec(LAKE_ID, name="Small", kwargs={"desc": ["SFF", "FHF", "HFG"]})
ROOT = Path(__file__).resolve().parent.parent


def built(seed: int = 0, spec: EnvSpec = SMALL_LAKE, **model) -> Partner:
    """A fresh tiny partner (weights seeded) whose tokenizer knows `spec`'s text, its config changed by `model`."""
    cfg = tiny_model_config(**model)
    model_, tokenizer = build_ancestor(cfg, *loop.env_corpus([spec]), seed=seed)
    return Partner("A", model_.eval(), tokenizer, cfg)


def rows_of(partner: Partner, spec: EnvSpec = SMALL_LAKE, episodes: int = 32) -> list[dict]:
    return collect(
        partner,
        spec,
        list(range(episodes)),
        RolloutConfig(episodes=episodes, group_size=4, num_envs=episodes),
        torch.Generator().manual_seed(0),
        EpisodeMeta(partner="A"),
    )


def gradients(partner: Partner) -> list[torch.Tensor]:
    params = [*partner.model.parameters(), *(partner.value_head.parameters() if partner.value_head else [])]
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def zero_grads(partner: Partner) -> None:
    partner.model.zero_grad(set_to_none=True)
    if partner.value_head is not None:
        partner.value_head.zero_grad(set_to_none=True)


# --- gradient accumulation ------------------------------------------------------------------------------------


def mixed_items(partner: Partner) -> list[Item]:
    """Own, peer and distillation items with random advantages and value targets (each row once: no merging). The
    peer steps' behaviour log-probs are moved at random, as a partner's policy differs, so their importance ratios
    are not 1 (some above learn.peer_ratio_cap)."""
    rows = rows_of(partner)
    gen = torch.Generator().manual_seed(1)
    adv, targets, shift = torch.randn(3, len(rows), generator=gen).tolist()
    third = len(rows) // 3
    items = [Item("own", r, a, t) for r, a, t in zip(rows[:third], adv, targets)]
    items += [
        Item("peer", {**r, "logprob": r["logprob"] + s}, a, t)
        for r, a, t, s in zip(rows[third : 2 * third], adv[third:], targets[third:], shift)
    ]
    items += [Item("distill", r, 0.0) for r in rows[2 * third :]]
    return items[::2] + items[1::2]  # kinds interleaved, so micro-batches hold different mixes


def test_micro_batches_add_up_to_the_whole_batchs_loss_and_gradients():
    """learn.micro_batch_size: every term keeps the whole batch's normalization (the value loss's count of peer
    steps weighted by importance ratios included), so the accumulated gradients are the batch's."""
    partner, teachers = built(seed=4), [built(seed=5), built(seed=6)]
    items = mixed_items(partner)
    value_head_for(partner)
    with torch.no_grad():  # a value head that predicts something, so the value loss has gradients everywhere
        partner.value_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    cfg = LearnConfig(advantage="gae", entropy_coef=0.1, mutual_kl_coef=0.3, peer_ratio_cap=1.5)
    partner.model.train()
    loss, parts = batch_loss(partner, items, cfg, teachers)
    loss.backward()
    whole = gradients(partner)
    for size in (7, 16, len(items) - 1):
        zero_grads(partner)
        micro = dataclasses.replace(cfg, micro_batch_size=size)
        accumulated, micro_parts = accumulated_loss(partner, items, micro, teachers)
        assert accumulated.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert micro_parts == pytest.approx(parts, rel=1e-5, abs=1e-6)
        for a, b in zip(whole, gradients(partner)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in whole) > 0
    assert parts["loss/value"] > 0 and parts["loss/kl"] > 0 and parts["loss/peer_rl"] != 0


def count_forwards(module: torch.nn.Module) -> list[int]:
    """Returns a one-element list that counts the module's forward calls from now on."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_learn_with_micro_batches_makes_the_same_first_update():
    """One epoch, one batch: the statistics (computed before the step) are the whole batch's, in more passes."""
    rows = rows_of(built(seed=6))
    for r in rows:
        r["success"] = True
    stats, passes = {}, {}
    for size in (0, 5):
        partner = built(seed=6)
        calls = count_forwards(partner.model)
        cfg = LearnConfig(epochs=1, micro_batch_size=size)
        stats[size] = learn(partner, own=rows, peer=rows, distill=rows[:10], cfg=cfg, seed=0)
        passes[size] = calls[0]
    assert stats[5]["learn/updates"] == stats[0]["learn/updates"] == 1
    assert stats[5] == pytest.approx(stats[0], rel=1e-5, abs=1e-6)
    assert passes[5] > passes[0] + 2  # the accumulated step went through the model in several passes


def test_micro_batch_size_is_validated():
    with pytest.raises(ColearnError, match="learn.micro_batch_size=-1"):
        LearnConfig(micro_batch_size=-1)


# --- gradient checkpointing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_recomputes_activations_and_gives_the_same_gradients(lora_rank, tmp_path):
    results = {}
    for checkpointing in (False, True):
        partner = built(seed=7, lora_rank=lora_rank, gradient_checkpointing=checkpointing)
        items = mixed_items(partner)
        value_head_for(partner)
        layer = next(m for m in partner.model.modules() if type(m).__name__.endswith("DecoderLayer"))
        runs = count_forwards(layer.mlp)  # inside the checkpoint: the layer's own hooks may run only once
        partner.model.train()
        loss, _ = batch_loss(partner, items, LearnConfig(advantage="gae"))
        forwards = runs[0]
        loss.backward()
        results[checkpointing] = (loss.item(), gradients(partner), forwards, runs[0] - forwards)
    (loss, grads, forwards, recomputed), (loss_ckpt, grads_ckpt, forwards_ckpt, recomputed_ckpt) = results.values()
    assert recomputed == 0 and recomputed_ckpt == forwards_ckpt == forwards > 0  # each layer ran again in backward
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))
    assert sum(float(g.abs().sum()) for g in grads_ckpt) > 0


def test_a_saved_partner_loads_with_gradient_checkpointing_on(tmp_path):
    partner = built(seed=0, lora_rank=4, gradient_checkpointing=True)
    partner.save(tmp_path / "A")
    for p in (Partner.load(tmp_path / "A", "A", partner.cfg), partner.clone("B")):
        flags = [m.gradient_checkpointing for m in p.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        assert flags and all(flags)


# --- mixed precision and bfloat16 weights ---------------------------------------------------------------------


def test_autocast_config_is_validated():
    with pytest.raises(ColearnError, match="model.autocast: 'float16' is not one of none, bfloat16"):
        ModelConfig(autocast="float16")
    with pytest.raises(ColearnError, match="model.autocast=bfloat16 with model.dtype=float16"):
        ModelConfig(autocast="bfloat16", dtype="float16")


def test_mixed_precision_acts_consistently_and_learns():
    """model.autocast=bfloat16 on the CPU: forward passes run in bfloat16 (log-probs move off the float32 ones by
    bfloat16 rounding), the learner recomputes the behaviour log-probs it acted with, and distillation learns."""
    full = built(seed=8, spec=LINE)
    mixed = Partner("A", full.model, full.tokenizer, tiny_model_config(autocast="bfloat16"))
    rows = rows_of(mixed, LINE, episodes=16)
    observations, legal = sorted({r["observation"] for r in rows}), rows[0]["legal_actions"]
    exact, rounded = full.action_logprobs(observations, legal), mixed.action_logprobs(observations, legal)
    assert exact.dtype == rounded.dtype == torch.float32
    assert 0 < float((exact - rounded).abs().max()) < 0.05
    policy_lp, _, _ = row_logprobs(mixed, rows)
    assert torch.allclose(policy_lp, torch.tensor([r["logprob"] for r in rows]), atol=2e-2)
    good = select_for_distillation(rows, "success", 1.0)
    assert good and all(r["action"] == "right" for r in good)  # loop-free successes only ever go right
    right = legal.index("right")
    before = mixed.action_logprobs(observations, legal)[:, right]
    stats = learn(mixed, own=[], peer=[], distill=good, cfg=LearnConfig(epochs=20, lr=3e-3), seed=0)
    after = mixed.action_logprobs(observations, legal)[:, right]
    assert stats["learn/updates"] == 20 and (after > before + 0.5).all(), (before, after)
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}  # the weights stay in model.dtype


def test_bfloat16_lora_partner_saves_and_loads_its_dtypes_and_outputs(tmp_path):
    partner = built(seed=9, lora_rank=4, dtype="bfloat16")
    with torch.no_grad():  # a trained adapter: its B factors are no longer zero
        for name, p in partner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    partner.save(tmp_path / "A")
    loaded = Partner.load(tmp_path / "A", "A", partner.cfg)
    for p in (partner, loaded):
        dtypes = {("lora" in n, q.dtype) for n, q in p.model.named_parameters()}
        assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    observations = ["PFG\nP at row 0 col 0"]
    legal = ["left", "right"]
    assert torch.equal(partner.action_logprobs(observations, legal), loaded.action_logprobs(observations, legal))


def test_a_lora_change_below_bfloat16_resolution_survives_dense_weights_and_the_adapter_offspring():
    """A LoRA partner's dense weights are float32 on a bfloat16 base (the fold into bfloat16 would round the change
    away), and an adapter offspring keeps its re-factorized change in the adapter's float32, exactly."""
    from colearn.breeding.offspring import make_offspring

    root = built(seed=10, lora_rank=2, dtype="bfloat16")
    pair = []
    for seed in (1, 2):
        child = root.clone(f"P{seed}")
        with torch.no_grad():
            for name, p in child.model.named_parameters():
                if "lora_B" in name:  # B moves, A stays shared: the mean change fits the rank
                    p.normal_(0, 1e-6, generator=torch.Generator().manual_seed(seed))
        pair.append(child)
    base, dense = dense_state(root), [dense_state(p) for p in pair]
    assert all(v.dtype == torch.float32 for v in dense[0].values())
    moved = [k for k in base if not torch.equal(dense[0][k], base[k])]
    assert moved and all(float((dense[0][k] != base[k]).float().mean()) > 0.9 for k in moved)
    bf16_folded = copy.deepcopy(pair[0].model).merge_and_unload().state_dict()
    kept = [float((bf16_folded[k].float() != base[k]).float().mean()) for k in moved]
    assert max(kept) < 0.5  # a half-precision fold would have lost most of the change
    cfg = MergeConfig(method="linear", gate=False, lora_offspring="adapter")
    result = make_offspring(root, pair, {"P1": 0, "P2": 0}, cfg)
    assert result.lora["truncation_error"] < 1e-2  # the change fits the rank; float32 differences of weights 1e4
    merged = dense_state(result.partner)  # times larger than it leave it this much
    for k in moved:
        want = (dense[0][k] + dense[1][k]) / 2 - base[k]
        assert torch.allclose(merged[k] - base[k], want, rtol=1e-2, atol=1e-8), k
    factors = [p for n, p in result.partner.model.named_parameters() if "lora" in n]
    assert {p.dtype for p in factors} == {torch.float32}
    assert all((p != p.bfloat16().float()).any() for p in factors)  # not rounded through the base's dtype


# --- generation -----------------------------------------------------------------------------------------------


def test_generation_batches_every_live_episode_and_reuses_the_kv_cache():
    spec = EnvSpec(ADDITION_ID, kwargs={"digits": 1})
    partner = built(seed=11, spec=spec)
    shapes = []  # (batch, tokens) of the input ids of every forward pass
    partner.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    cfg = RolloutConfig(episodes=8, group_size=1, num_envs=8, mode="generate", max_new_tokens=4)
    rows = collect(partner, spec, list(range(8)), cfg, torch.Generator().manual_seed(0), EpisodeMeta(partner="A"))
    assert len(rows) == 8  # one step an episode, the 8 sub-envs in one batch
    (prefill, *decoded, scoring) = shapes  # generate's passes, then the answers scored in one
    assert prefill[0] == scoring[0] == 8 and prefill[1] > 1
    assert decoded and all(shape == (8, 1) for shape in decoded)  # each new token alone: the rest is cached
    assert max(len(r["action_ids"]) for r in rows) == len(decoded) + 1


# --- the smoke script -----------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: the script would run")
def test_gpu_smoke_skips_in_one_line_without_cuda():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("gpu_smoke: skipped: no CUDA device")
