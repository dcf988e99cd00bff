"""Any Hugging Face causal LM: tiny random Llama, Qwen2, GPT-2, Mistral and Gemma directories, each with a character
tokenizer under which every action name is several tokens, run one generation of the real loop (act, learn, merge,
evaluate) with full weights and with LoRA, and `colearn export` writes a directory that loads offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM

from colearn import loop
from colearn.cli.experiment import CONF_DIR, register_configs, to_config, validate
from colearn.cli.export import main as export
from colearn.models.build import build_tokenizer
from colearn.models.partner import Partner
from tests.conftest import LAKE_ID

ATTN = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
ARCHITECTURES = {  # model_type -> a tiny config; tied embeddings as each family ships (GPT-2, Gemma tie)
    "llama": ATTN,
    "qwen2": {**ATTN, "num_key_value_heads": 1},  # grouped-query attention
    "mistral": {**ATTN, "num_key_value_heads": 1, "sliding_window": 64},
    "gemma": {**ATTN, "num_key_value_heads": 1, "head_dim": 16},  # GemmaConfig defaults: 16 kv heads of 256
    "gpt2": {"n_embd": 32, "n_inner": 64, "n_layer": 1, "n_head": 2, "n_positions": 256},
}
TINY_RUN = [
    "env=lake",
    "loop.generations=1",
    "loop.rounds=1",
    "rollout.episodes=8",
    "rollout.group_size=4",
    "rollout.num_envs=8",
    "eval.episodes=2",
    "integrate.modes=[]",
    "merge.gate=false",  # the offspring is the merge, whatever it scores
    "probe_size=4",
    "progress=false",
]
PROMPT = "PFFF\nFHFH\nFFFH\nHFFG\nP at row 0 col 0\nAction:"


def composed(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


def tiny_model_dir(model_type: str, root: Path) -> Path:
    """Saves a randomly initialized model of `model_type` and a character tokenizer (no action name is one token,
    as with a real model's tokenizer) to root/model_type; returns the directory."""
    from colearn.config import EnvSpec
    from colearn.loop import env_corpus

    texts, _ = env_corpus([EnvSpec(LAKE_ID)])
    tokenizer = build_tokenizer(texts, [], "{obs}\nAction:")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURES[model_type],
    )
    torch.manual_seed(0)
    path = root / model_type
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def exported_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer([PROMPT + " right"], return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_a_generation_of_any_architecture_runs_and_exports(model_type, lora, tmp_path, monkeypatch):
    source = tiny_model_dir(model_type, tmp_path)
    # LoRA with model.lora_targets=[]: peft's default modules for the model type (c_attn on GPT-2, q/v elsewhere)
    adapter = ["model.lora_rank=4", "model.lora_targets=[]"] if lora else []
    cfg = composed(["model=local", f"model.source={source}", *adapter, *TINY_RUN])
    validate(cfg)
    run_dir = tmp_path / "run"
    loop.run(cfg, run_dir)

    recipe = json.loads((run_dir / "lineage.json").read_text())[0]["recipe"]
    assert (recipe["method"], recipe["outcome"]) == ("linear", "merged")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    learned = [e for e in events if e["event"] == "learn"]
    assert sorted(e["partner"] for e in learned) == ["A", "B"]
    assert all(e[f"learn/rows/{e['partner']}"] > 0 for e in learned)
    scored = {(e["partner"], e["policy"]) for e in events if e["event"] == "eval" and e["env"] == "Lake"}
    assert {("offspring", "greedy"), ("offspring", "sampled")} <= scored

    # the partners learned: A's weights moved away from the ancestor's
    gen = run_dir / "checkpoints" / "gen_0000"
    ancestor, a = (Partner.load(gen / n, n, cfg.model) for n in ("ancestor", "A"))
    assert not torch.allclose(exported_logits(a.model, a.tokenizer), exported_logits(ancestor.model, a.tokenizer))

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exported"
    export([str(run_dir), str(out), "--generation", "0"])
    offspring = Partner.load(gen / "offspring", "offspring", cfg.model)
    want = exported_logits(offspring.model, offspring.tokenizer)
    if (out / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        loaded = AutoPeftModelForCausalLM.from_pretrained(out)
        assert lora
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.model_type == model_type
    assert torch.allclose(exported_logits(loaded, offspring.tokenizer), want, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_padded_batches_score_as_each_prompt_alone(model_type, tmp_path):
    # left padding (next-token logits, with position ids) and right padding (continuations) change no number
    from colearn.models.build import load_pretrained
    from colearn.models.policy import continuation_stats, last_logits

    model, tokenizer = load_pretrained(str(tiny_model_dir(model_type, tmp_path)))
    model.eval()
    prompts = tokenizer([PROMPT, "SFG\nP at row 0 col 1\nAction:"])["input_ids"]
    conts = tokenizer([" right", " up"], add_special_tokens=False)["input_ids"]
    assert len(prompts[0]) != len(prompts[1]) and len(conts[0]) != len(conts[1])
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        batched = last_logits(model, prompts, pad)
        alone = torch.cat([last_logits(model, [p], pad) for p in prompts])
        assert torch.allclose(batched, alone, atol=1e-5)
        batched, _ = continuation_stats(model, prompts, conts, pad)
        alone = torch.cat([continuation_stats(model, [p], [c], pad)[0] for p, c in zip(prompts, conts)])
        assert torch.allclose(batched, alone, atol=1e-5)


PRESETS = {"smollm2_135m": "llama", "qwen2_5_0_5b_lora": "qwen2"}  # conf/model preset -> its model's architecture


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_real_model_preset_acts_with_a_local_directory(preset, tmp_path):
    from peft import PeftModel

    from colearn.models.build import build_ancestor

    source = tiny_model_dir(PRESETS[preset], tmp_path)  # the real model's architecture, tiny and random
    cfg = composed([f"model={preset}", f"model.source={source}"])
    validate(cfg)
    model, tokenizer = build_ancestor(cfg.model, [], [], seed=0)
    assert isinstance(model, PeftModel) == (cfg.model.lora_rank > 0)
    if cfg.model.lora_rank:  # every target module of the preset exists in the architecture and got an adapter
        adapted = {n.split(".")[-4] for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad}
        assert adapted == set(cfg.model.lora_targets)
    partner = Partner("A", model.eval(), tokenizer, cfg.model)
    assert partner.prompt_ids(["SFG"])[0] == tokenizer(cfg.model.prompt_template.format(obs="SFG"))["input_ids"]
    actions = ["left", "down", "right", "up"]
    acted = partner.act(["SFG\nP at row 0 col 0"] * 3, actions, greedy=False, generator=torch.Generator())
    assert all(t in actions for t in acted.texts) and all(lp < 0 for lp in acted.logprobs)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_learner_scores_multi_token_actions_as_acting_did(model_type, tmp_path):
    """Every action name is several tokens here: the learner's log-probability of a stored step, with the weights
    that acted, is the behaviour log-probability acting stored (renormalized over the legal actions), so PPO's ratio
    starts at 1 and the KL stop (learn.target_kl) measures how far learning moved the policy."""
    from colearn.config import EnvSpec, RolloutConfig
    from colearn.experience.rollout import EpisodeMeta, collect
    from colearn.learning.learn import row_logprobs

    cfg = composed(["model=local", f"model.source={tiny_model_dir(model_type, tmp_path)}"])
    partner = Partner.load(cfg.model.source, "A", cfg.model)
    assert max(len(a) for a in partner.action_ids(["left", "down", "right", "up"])) > 1
    rollout = RolloutConfig(episodes=8, group_size=4, num_envs=8, temperature=1.5)
    rows = collect(
        partner, EnvSpec(LAKE_ID), list(range(8)), rollout, torch.Generator().manual_seed(0), EpisodeMeta("A")
    )
    logp, entropy, token_lp = row_logprobs(partner, rows, temperature=1.5)
    assert logp.tolist() == pytest.approx([r["logprob"] for r in rows], abs=1e-4)
    assert (token_lp < logp).all() and (entropy > 0).all()  # a sequence's likelihood over the whole vocabulary
