"""Tests of colearn.models.partner (acting, sampling, generation, saving) and the policy functions it uses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from colearn.errors import ColearnError
from colearn.learning.learn import row_logprobs
from colearn.models.partner import Partner
from colearn.models.policy import continuation_stats, legal_action_logprobs

LAKE_ACTIONS = ["left", "down", "right", "up"]
GRIDS = [
    "SFFF\nFHFH\nFFFH\nHFFG".replace("S", "P", 1),
    "SPFF\nFHFH\nFFFH\nHFFG",
    "SFFF\nFPFH\nFFFH\nHFFG",
    "SFFF\nFHFH\nFFPH\nHFFG",
]
# prompts of different lengths, so batches are padded
MIXED = [GRIDS[0], "3+4=", GRIDS[2], "12+34=", "9+9="]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def sharp(ancestor, model_cfg):
    """A partner whose weights are redrawn at a large scale, so its outputs depend on the input and its
    action distributions are far from uniform."""
    model = copy.deepcopy(ancestor[0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return Partner("S", model.eval(), ancestor[1], model_cfg)


def unpadded_next_logits(partner: Partner, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return partner.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


def unpadded_sequence_logprob(partner: Partner, prompt: list[int], cont: list[int], temperature: float = 1.0) -> float:
    """log p(cont | prompt) from one unpadded forward pass, token by token."""
    with torch.no_grad():
        logits = partner.model(input_ids=torch.tensor([prompt + cont])).logits[0].float() / temperature
    logps = F.log_softmax(logits, -1)
    return float(sum(logps[len(prompt) - 1 + k, t] for k, t in enumerate(cont)))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- constrained acting ---------------------------------------------------------------------------


@pytest.mark.parametrize("greedy", [False, True])
def test_constrained_actions_are_legal_with_their_logprobs(sharp, greedy):
    acts = sharp.act(MIXED * 4, LAKE_ACTIONS, greedy=greedy, generator=gen())
    assert len(acts.texts) == len(acts.logprobs) == len(acts.token_ids) == len(MIXED) * 4
    assert set(acts.texts) <= set(LAKE_ACTIONS)
    assert all(lp <= 0 for lp in acts.logprobs)
    fresh = legal_action_logprobs(
        sharp.model, sharp.prompt_ids(MIXED * 4), sharp.action_ids(LAKE_ACTIONS), sharp.tokenizer.pad_token_id
    )
    chosen = fresh[torch.arange(len(acts.texts)), [LAKE_ACTIONS.index(t) for t in acts.texts]]
    assert torch.allclose(torch.tensor(acts.logprobs), chosen, atol=1e-5)
    for text, ids in zip(acts.texts, acts.token_ids):
        assert ids == sharp.action_ids([text])[0]


def test_batched_legal_logprobs_equal_unpadded_forward_passes(sharp):
    """Left padding and position ids must not change a prompt's action distribution."""
    action_ids = sharp.action_ids(LAKE_ACTIONS)
    batched = legal_action_logprobs(sharp.model, sharp.prompt_ids(MIXED), action_ids, sharp.tokenizer.pad_token_id)
    assert torch.allclose(batched.exp().sum(-1), torch.ones(len(MIXED)), atol=1e-5)
    for row, prompt in zip(batched, sharp.prompt_ids(MIXED)):
        logits = unpadded_next_logits(sharp, prompt)
        expected = F.log_softmax(logits[[a[0] for a in action_ids]], -1)
        assert torch.allclose(row, expected, atol=1e-5)


def test_greedy_picks_the_argmax(sharp):
    acts = sharp.act(MIXED, LAKE_ACTIONS, greedy=True, generator=gen())
    logps = legal_action_logprobs(
        sharp.model, sharp.prompt_ids(MIXED), sharp.action_ids(LAKE_ACTIONS), sharp.tokenizer.pad_token_id
    )
    assert acts.texts == [LAKE_ACTIONS[i] for i in logps.argmax(-1).tolist()]
    assert len(set(acts.texts)) > 1  # the sharp partner's argmax depends on the observation
    # greedy ignores the generator
    assert sharp.act(MIXED, LAKE_ACTIONS, greedy=True, generator=gen(99)).texts == acts.texts


def test_sampling_is_seeded(partner):
    obs = GRIDS * 16
    a = partner.act(obs, LAKE_ACTIONS, greedy=False, generator=gen(5))
    b = partner.act(obs, LAKE_ACTIONS, greedy=False, generator=gen(5))
    c = partner.act(obs, LAKE_ACTIONS, greedy=False, generator=gen(6))
    assert a.texts == b.texts and a.logprobs == b.logprobs
    assert a.texts != c.texts


@pytest.mark.parametrize("who,temperature", [("sharp", 1.0), ("partner", 0.1)])
def test_sample_frequencies_match_probabilities(request, who, temperature):
    who = request.getfixturevalue(who)
    n = 4000
    obs = [GRIDS[1]] * n
    acts = who.act(obs, LAKE_ACTIONS, greedy=False, generator=gen(0), temperature=temperature)
    probs = legal_action_logprobs(
        who.model, who.prompt_ids(obs[:1]), who.action_ids(LAKE_ACTIONS), who.tokenizer.pad_token_id, temperature
    ).exp()[0]
    assert probs.max() - probs.min() > 0.2  # far from uniform, so the check can tell distributions apart
    freqs = torch.tensor([acts.texts.count(a) / n for a in LAKE_ACTIONS])
    assert torch.allclose(freqs, probs, atol=0.03), (freqs, probs)
    # returned log-probs are those of the (tempered) distribution sampled from
    expected = probs.log()[[LAKE_ACTIONS.index(t) for t in acts.texts]]
    assert torch.allclose(torch.tensor(acts.logprobs), expected, atol=1e-5)


def test_temperature_sharpens_the_distribution(partner):
    def top(temperature):
        return (
            legal_action_logprobs(
                partner.model,
                partner.prompt_ids(GRIDS[:1]),
                partner.action_ids(LAKE_ACTIONS),
                partner.tokenizer.pad_token_id,
                temperature,
            )
            .exp()
            .max()
        )

    assert top(0.1) > top(1.0) + 0.2
    assert top(0.01) > 0.99


# --- generate mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("greedy", [False, True])
def test_generate_returns_strings_with_recomputed_logprobs(sharp, partner, greedy):
    problems = [f"{a}+{b}=" for a in range(4) for b in range(4)] + ["12+34="]
    for who in (sharp, partner):
        acts = who.act(problems, None, greedy=greedy, generator=gen(3), max_new_tokens=6)
        assert len(acts.texts) == len(problems)
        assert all(isinstance(t, str) and "\n" not in t for t in acts.texts)
        assert all(1 <= len(ids) <= 6 for ids in acts.token_ids)
        prompts = who.prompt_ids(problems)
        recomputed, _ = continuation_stats(who.model, prompts, acts.token_ids, who.tokenizer.pad_token_id)
        assert torch.allclose(torch.tensor(acts.logprobs), recomputed, atol=1e-4)
        for p, ids, lp in zip(prompts, acts.token_ids, acts.logprobs):
            assert lp == pytest.approx(unpadded_sequence_logprob(who, p, ids), abs=1e-4)
            assert lp <= 0
        for text, ids in zip(acts.texts, acts.token_ids):
            assert text == who.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0]


@pytest.mark.parametrize("greedy", [False, True])
def test_generation_held_to_a_charset_uses_only_its_tokens_with_renormalized_logprobs(partner, greedy):
    """An answer held to digits has only digit tokens (and an end of sequence), and its log-probability is the
    product of per-step probabilities renormalized over those tokens, as the learner recomputes it."""
    problems = [f"{a}+{b}=" for a in range(6) for b in range(6)]
    allowed = partner.answer_ids("0123456789")
    eos = partner.tokenizer.eos_token_id
    assert len(allowed) == 11 and eos in allowed
    acts = partner.act(problems, None, greedy=greedy, generator=gen(4), max_new_tokens=3, charset="0123456789")
    assert all(t.isdigit() or t == "" for t in acts.texts)
    assert all(set(ids) <= set(allowed) and len(ids) <= 3 for ids in acts.token_ids)
    for prompt, ids, lp in zip(partner.prompt_ids(problems), acts.token_ids, acts.logprobs):
        with torch.no_grad():
            logits = partner.model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        steps = F.log_softmax(logits[:, allowed], -1)  # renormalized over the allowed tokens
        by_hand = sum(float(steps[len(prompt) - 1 + k, allowed.index(t)]) for k, t in enumerate(ids))
        assert lp == pytest.approx(by_hand, abs=1e-4)
        assert lp > unpadded_sequence_logprob(partner, prompt, ids)  # the unheld policy spreads over every token
    rows = [
        {"legal_actions": [], "action_charset": "0123456789", "prompt_ids": p, "action_ids": ids}
        for p, ids in zip(partner.prompt_ids(problems), acts.token_ids)
    ]
    with torch.no_grad():
        recomputed, _, _ = row_logprobs(partner, rows)
    assert torch.allclose(recomputed, torch.tensor(acts.logprobs), atol=1e-4)


def test_generate_sampling_is_seeded(partner):
    problems = [f"{a}+{b}=" for a in range(5) for b in range(5)]
    a = partner.act(problems, None, greedy=False, generator=gen(11))
    b = partner.act(problems, None, greedy=False, generator=gen(11))
    c = partner.act(problems, None, greedy=False, generator=gen(12))
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids


def test_greedy_generation_follows_the_argmax_in_a_padded_batch(sharp):
    """Each greedily generated token is the argmax of an unpadded forward pass over prompt + prefix,
    and the batch gives the same continuations as one prompt at a time."""
    acts = sharp.act(MIXED, None, greedy=True, generator=gen(), max_new_tokens=5)
    for prompt, ids in zip(sharp.prompt_ids(MIXED), acts.token_ids):
        for k, token in enumerate(ids):
            assert int(unpadded_next_logits(sharp, prompt + ids[:k]).argmax()) == token
    singles = [sharp.act([o], None, greedy=True, generator=gen(), max_new_tokens=5).token_ids[0] for o in MIXED]
    assert singles == acts.token_ids


def test_continuation_without_eos_keeps_every_generated_token(partner):
    problems = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    acts = partner.act(problems, None, greedy=False, generator=gen(0), max_new_tokens=8)
    eos = partner.tokenizer.eos_token_id
    for ids in acts.token_ids:
        if eos not in ids:
            assert len(ids) == 8, ids  # generation stops early only at eos
        else:
            assert ids.index(eos) == len(ids) - 1


# --- multi-token actions --------------------------------------------------------------------------


def test_multi_token_actions_form_a_distribution(sharp, partner):
    legal = ["north", "south"]
    for who in (sharp, partner):
        fresh = Partner(who.name, who.model, who.tokenizer, who.cfg)
        action_ids = fresh.action_ids(legal)
        assert all(len(a) > 1 for a in action_ids)  # not single tokens in the env tokenizer
        logps = legal_action_logprobs(who.model, fresh.prompt_ids(MIXED), action_ids, who.tokenizer.pad_token_id)
        assert logps.shape == (len(MIXED), 2)
        assert torch.allclose(logps.exp().sum(-1), torch.ones(len(MIXED)), atol=1e-5)
        for row, prompt in zip(logps, fresh.prompt_ids(MIXED)):
            seq = torch.tensor([unpadded_sequence_logprob(who, prompt, a) for a in action_ids])
            assert torch.allclose(row, F.log_softmax(seq, -1), atol=1e-4)
        acts = fresh.act(MIXED * 8, legal, greedy=False, generator=gen(2))
        assert set(acts.texts) <= set(legal)
        index = [legal.index(t) for t in acts.texts]
        expected = logps.repeat(8, 1)[torch.arange(len(index)), index]
        assert torch.allclose(torch.tensor(acts.logprobs), expected, atol=1e-5)
        greedy = fresh.act(MIXED, legal, greedy=True, generator=gen())
        assert greedy.texts == [legal[i] for i in logps.argmax(-1).tolist()]


def test_mixed_single_and_multi_token_legal_set_is_a_distribution(partner):
    legal = ["left", "north"]  # one single-token, one multi-token action: the continuation path
    logps = legal_action_logprobs(
        partner.model, partner.prompt_ids(MIXED), partner.action_ids(legal), partner.tokenizer.pad_token_id
    )
    assert torch.allclose(logps.exp().sum(-1), torch.ones(len(MIXED)), atol=1e-5)


# --- clone, save, load ----------------------------------------------------------------------------


def test_clone_owns_its_weights(partner):
    child = partner.clone("B", ["Lake"])
    assert child.name == "B" and child.envs == ["Lake"] and child.optimizer is None
    with torch.no_grad():
        next(child.model.parameters()).add_(1.0)
    assert not torch.equal(next(child.model.parameters()), next(partner.model.parameters()))


def test_save_then_load_gives_identical_logprobs(sharp, tmp_path):
    model = copy.deepcopy(sharp.model)
    saver = Partner("S", model, sharp.tokenizer, sharp.cfg)
    saver.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    saver.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "optimizer.pt").exists()

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    reopened = Partner("R", hf_model, hf_tok, sharp.cfg)
    loaded = Partner.load(tmp_path / "ckpt", "L", sharp.cfg)
    loaded.model.eval()
    ref = legal_action_logprobs(
        sharp.model, sharp.prompt_ids(MIXED), sharp.action_ids(LAKE_ACTIONS), sharp.tokenizer.pad_token_id
    )
    for other in (reopened, loaded):
        assert other.prompt_ids(MIXED) == sharp.prompt_ids(MIXED)
        assert other.action_ids(LAKE_ACTIONS) == sharp.action_ids(LAKE_ACTIONS)
        got = legal_action_logprobs(
            other.model, other.prompt_ids(MIXED), other.action_ids(LAKE_ACTIONS), other.tokenizer.pad_token_id
        )
        assert torch.equal(got, ref)
        a = other.act(MIXED, LAKE_ACTIONS, greedy=False, generator=gen(4))
        b = sharp.act(MIXED, LAKE_ACTIONS, greedy=False, generator=gen(4))
        assert a.texts == b.texts


def test_load_of_a_non_checkpoint_is_a_colearn_error(model_cfg, tmp_path):
    with pytest.raises(ColearnError, match="config.json"):
        Partner.load(tmp_path, "X", model_cfg)


def test_lora_partner_saves_and_loads_as_adapter(corpus, tmp_path):
    from colearn.config import ModelConfig
    from colearn.models.build import build_ancestor

    texts, names = corpus
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, lora_rank=4)
    model, tok = build_ancestor(cfg, texts, names, seed=0)
    with torch.no_grad():  # move the adapter away from the identity so the check means something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=gen(7))
    partner = Partner("A", model.eval(), tok, cfg)
    partner.save(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    loaded = Partner.load(tmp_path, "A", cfg)
    loaded.model.eval()
    ref = legal_action_logprobs(model, partner.prompt_ids(MIXED), partner.action_ids(LAKE_ACTIONS), tok.pad_token_id)
    got = legal_action_logprobs(
        loaded.model, loaded.prompt_ids(MIXED), loaded.action_ids(LAKE_ACTIONS), loaded.tokenizer.pad_token_id
    )
    assert torch.allclose(got, ref, atol=1e-6)
    assert any(p.requires_grad for n, p in loaded.model.named_parameters() if "lora_" in n)
