"""Tests of colearn.models.build: the env tokenizer, the tiny Llama, loading local HF dirs, LoRA, devices."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from colearn.config import ModelConfig
from colearn.errors import ColearnError
from colearn.models.build import build_ancestor, build_tiny_model, build_tokenizer, load_pretrained, resolve_device
from colearn.models.partner import Partner

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2}
LAKE_ACTIONS = ["left", "down", "right", "up"]
GRID = "SFFF\nFPFH\nFFFH\nHFFG"


# --- tokenizer ------------------------------------------------------------------------------------


def test_each_lake_action_with_prefix_is_one_token(tokenizer, model_cfg):
    ids = [tokenizer(model_cfg.action_prefix + a, add_special_tokens=False)["input_ids"] for a in LAKE_ACTIONS]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == 4  # four distinct tokens
    assert [tokenizer.decode(i).strip() for i in ids] == LAKE_ACTIONS
    assert tokenizer.unk_token_id not in [i[0] for i in ids]


def test_grid_text_round_trips(tokenizer, corpus):
    texts, _ = corpus
    for text in [GRID, *texts[:10], "7+8="]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # character level: one token per character of the grid (plus <s>)
    assert len(tokenizer(GRID)["input_ids"]) == len(GRID) + 1


def test_text_with_action_words_round_trips(tokenizer):
    for text in ["pick up the cup", "go down now"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_prompt_template_words_are_single_tokens(tokenizer, model_cfg):
    prompt = model_cfg.prompt_template.format(obs=GRID)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    assert tokens[-1] == "Action:"
    assert tokens[0] == "<s>" and tokens[1:-1] == list(GRID + "\n")


def test_saved_tokenizer_reloads_with_identical_ids(tokenizer, corpus, model_cfg, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts, _ = corpus
    samples = [GRID, model_cfg.prompt_template.format(obs=GRID), "3+4=", *texts[:5]]
    samples += [model_cfg.action_prefix + a for a in LAKE_ACTIONS] + [" north", "Action: left"]
    for s in samples:
        assert reloaded(s)["input_ids"] == tokenizer(s)["input_ids"], s
        assert reloaded(s, add_special_tokens=False)["input_ids"] == tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(reloaded) == len(tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(reloaded, attr) == getattr(tokenizer, attr), attr


def test_tokenizer_covers_every_corpus_character():
    tok = build_tokenizer(["é→"], ["jump"], "{obs}\nAction:")
    ids = tok("é→")["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 3
    assert len(tok(" jump", add_special_tokens=False)["input_ids"]) == 1


# --- tiny model -----------------------------------------------------------------------------------


def test_tiny_model_parameter_count(ancestor):
    model, tokenizer = ancestor
    h, inter, v = 32, 64, len(tokenizer)
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # attention, MLP, two RMSNorms
    expected = v * h + per_layer + h  # tied embedding/lm_head, one layer, final norm
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 5_000 < expected < 50_000
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32


def test_same_seed_same_weights_different_seed_different(tokenizer):
    cfg = ModelConfig(**TINY)
    a, b, c = (build_tiny_model(cfg, tokenizer, seed) for seed in (3, 3, 4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_tiny_model_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(ModelConfig(**TINY), tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_is_applied(tokenizer):
    model = build_tiny_model(ModelConfig(**TINY, dtype="bfloat16"), tokenizer, 0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- local Hugging Face directories ---------------------------------------------------------------


def test_load_pretrained_round_trip_and_partner_acts(ancestor, model_cfg, tmp_path):
    model, tokenizer = ancestor
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_pretrained(str(tmp_path))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert loaded_tok(GRID)["input_ids"] == tokenizer(GRID)["input_ids"]

    # a local dir is also what model.source names: build_ancestor goes through load_pretrained
    cfg = ModelConfig(**{**TINY, "source": str(tmp_path)})
    via_source, _ = build_ancestor(cfg, [], [], seed=0)
    assert torch.equal(via_source.get_input_embeddings().weight, model.get_input_embeddings().weight)

    partner = Partner("L", loaded.eval(), loaded_tok, model_cfg)
    original = Partner("O", model, tokenizer, model_cfg)
    gen = torch.Generator().manual_seed(0)
    acts = partner.act([GRID, "SPFF\nFHFH\nFFFH\nHFFG"], LAKE_ACTIONS, greedy=True, generator=gen)
    ref = original.act([GRID, "SPFF\nFHFH\nFFFH\nHFFG"], LAKE_ACTIONS, greedy=True, generator=gen)
    assert all(t in LAKE_ACTIONS for t in acts.texts)
    assert acts.texts == ref.texts
    assert acts.logprobs == pytest.approx(ref.logprobs, abs=1e-6)


def test_load_pretrained_missing_dir_names_model_source(tmp_path):
    with pytest.raises(ColearnError, match="model.source"):
        load_pretrained(str(tmp_path / "nope"))


def test_load_pretrained_without_tokenizer_names_model_source(ancestor, tmp_path):
    ancestor[0].save_pretrained(tmp_path)
    with pytest.raises(ColearnError, match="model.source") as info:
        load_pretrained(str(tmp_path))
    assert "tokenizer" in str(info.value)


def test_load_pretrained_without_weights_names_model_source(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ColearnError, match="model.source"):
        load_pretrained(str(tmp_path))


# --- LoRA -----------------------------------------------------------------------------------------


def test_lora_wraps_with_only_lora_params_trainable(corpus):
    from peft import PeftModel

    texts, names = corpus
    cfg = ModelConfig(**TINY, lora_rank=4)
    model, _ = build_ancestor(cfg, texts, names, seed=0)
    assert isinstance(model, PeftModel)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # q, k, v, o of the single layer: r * (in + out) each
    assert sum(p.numel() for p in trainable.values()) == 4 * 4 * (32 + 32)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)
    # a fresh adapter starts as the identity: same outputs as the base model built with the same seed
    base, tok = build_ancestor(ModelConfig(**TINY), texts, names, seed=0)
    ids = torch.tensor([tok(GRID)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_lora_with_unknown_targets_is_a_colearn_error(corpus):
    texts, names = corpus
    with pytest.raises(ColearnError, match="model.lora_targets"):
        build_ancestor(ModelConfig(**TINY, lora_rank=4, lora_targets=["no_such_proj"]), texts, names, seed=0)


def test_model_config_rejects_bad_values():
    with pytest.raises(ColearnError, match="model.lora_rank"):
        ModelConfig(lora_rank=-1)
    with pytest.raises(ColearnError, match="model.dtype"):
        ModelConfig(dtype="float8")


# --- devices --------------------------------------------------------------------------------------


def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_resolve_device_cuda_without_cuda_is_a_colearn_error():
    with pytest.raises(ColearnError, match="CUDA"):
        resolve_device("cuda")


def test_resolve_device_garbage_is_a_colearn_error():
    with pytest.raises(ColearnError, match="device="):
        resolve_device("toaster")
