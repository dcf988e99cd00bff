"""Partner models: a tiny Llama and a tokenizer built from the environments' text, or any local HF model."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from colearn.config import ModelConfig
from colearn.errors import ColearnError
from colearn.models.directories import is_mixture, refuse_custom_code

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def resolve_device(name: str) -> torch.device:
    """Returns the torch device for config `device` ("auto" picks cuda, then mps, then cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ColearnError(f"device={name!r} is not a torch device; use cpu, cuda, cuda:N, mps or auto") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ColearnError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def build_tokenizer(
    texts: list[str], action_names: list[str], template: str, action_prefix: str = " "
) -> PreTrainedTokenizerFast:
    """Returns a character-level fast tokenizer over printable ASCII and every character of `texts`,
    with each action name and each word of the prompt template as one token (so a legal action is
    a single token and constrained acting needs one forward pass)."""
    chars = sorted(set(string.printable) | {c for t in texts for c in t})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    words = [w for w in template.replace("{obs}", " ").split() if len(w) > 1]
    # the action prefix plus the name (" left") is one token; the bare word elsewhere stays characters
    tok.add_tokens([AddedToken(action_prefix + n, normalized=False) for n in sorted(set(action_names))])
    tok.add_tokens([AddedToken(w, normalized=False) for w in words])
    return tok


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """Returns a freshly initialized small Llama sized by `cfg`, seeded, sharing the tokenizer's ids."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    for param in model.parameters():  # not model.to(dtype): the rotary frequencies (buffers) stay float32, as
        param.data = param.data.to(getattr(torch, cfg.dtype))  # from_pretrained keeps them: a reload computes the same
    return model


def load_pretrained(path: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Returns the model and tokenizer of a local Hugging Face model directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ColearnError(f"model.source={path!r} is not a directory; give a local Hugging Face model dir or 'tiny'")
    if is_mixture(p):  # a mixture offspring (merge.fallback=mixture) holds several models, not one
        raise ColearnError(
            f"model.source={path!r} is a colearn mixture, not one model; start from one of its "
            f"members: model.source={path}/members/<name>"
        )
    refuse_custom_code(p, "model.source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ColearnError(
            f"model.source={path!r} has no loadable tokenizer ({type(e).__name__}); save one there with "
            "tokenizer.save_pretrained(dir)"
        ) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, dtype), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ColearnError(f"model.source={path!r} has no loadable causal LM weights: {e}".splitlines()[0]) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def with_checkpointing(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Returns the model (a peft model's base changed in place) with activation checkpointing on when
    cfg.gradient_checkpointing: in training mode each decoder layer recomputes its activations in the backward pass.
    Non-reentrant (torch's recommended checkpoint), so frozen inputs need no requires_grad for a LoRA adapter's
    gradients to flow; transformers enables them anyway (`enable_input_require_grads`), which changes no number."""
    if not cfg.gradient_checkpointing:
        return model
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    if not base.supports_gradient_checkpointing:
        raise ColearnError(
            f"model.gradient_checkpointing=true but {type(base).__name__} does not support it; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x: the old name is deprecated there
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def with_lora(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Returns the model wrapped in a fresh LoRA adapter (peft) when cfg.lora_rank > 0, else the model."""
    if cfg.lora_rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets) or None,  # None: peft's default modules for the model type
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ColearnError(
            f"model.lora_targets={list(cfg.lora_targets)} do not fit this model ({e}".splitlines()[0]
            + "); name its linear modules, or [] for peft's default for the model type"
        ) from e


def build_ancestor(
    cfg: ModelConfig, texts: list[str], action_names: list[str], seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Returns the common ancestor model (optionally LoRA-wrapped) and its tokenizer."""
    if cfg.source == "tiny":
        tokenizer = build_tokenizer(texts, action_names, cfg.prompt_template, cfg.action_prefix)
        model = build_tiny_model(cfg, tokenizer, seed)
    else:
        model, tokenizer = load_pretrained(cfg.source, cfg.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return with_lora(with_checkpointing(model, cfg), cfg), tokenizer
