"""LoRA checkpoints and `colearn export`: the directories load offline with the standard peft and transformers
calls and give the partner's logits; the export's card says the prompt format, how to act and the scores."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from colearn import loop
from colearn.cli.export import main as export
from colearn.config import Config, EnvConfig, EnvSpec, EvalConfig, LoopConfig, MergeConfig, PartnerSpec, RolloutConfig
from colearn.models.build import build_ancestor
from colearn.models.partner import Partner
from tests.conftest import LAKE_ID, tiny_model_config

LORA = tiny_model_config(lora_rank=4)
PROMPT = "PFFF\nFHFH\nFFFH\nHFFG\nP at row 0 col 0\nAction:"


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer([PROMPT + " right", PROMPT + " down"], return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


def lora_partner(corpus) -> Partner:
    """A LoRA partner whose adapter is far from the identity, so loading without it would show."""
    model, tokenizer = build_ancestor(LORA, *corpus, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return Partner("A", model.eval(), tokenizer, LORA)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory unrelated to the model directories (a relative base path would not resolve here)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_lora_checkpoint_loads_with_the_standard_calls(corpus, tmp_path, elsewhere):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    partner = lora_partner(corpus)
    final = tmp_path / "gen" / "A"
    partner.save(tmp_path / "gen.tmp" / "A", home=final)  # written aside, then renamed, as checkpoints are
    (tmp_path / "gen.tmp").rename(tmp_path / "gen")
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(final.resolve() / "base")
    want = logits(partner.model, partner.tokenizer)
    base_alone = logits(AutoModelForCausalLM.from_pretrained(final / "base"), partner.tokenizer)
    assert not torch.allclose(base_alone, want, atol=1e-3)  # the adapter matters
    peft_model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert isinstance(peft_model, PeftModel)
    assert torch.allclose(logits(peft_model, partner.tokenizer), want, atol=1e-5)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(final), partner.tokenizer), want, atol=1e-5)
    card = (final / "README.md").read_text()
    assert "AutoPeftModelForCausalLM.from_pretrained(DIR)" in card and repr(LORA.prompt_template) in card


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished one-generation LoRA run whose offspring keeps its merged change as an adapter, with the
    .hydra/config.yaml the CLI writes."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    suite = [EnvSpec(LAKE_ID, "Lake"), EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]})]
    partners = [PartnerSpec("A", ["Lake"]), PartnerSpec("B", ["Line"])]
    cfg = Config(
        model=LORA,
        env=EnvConfig(suite=suite, partners=partners),
        loop=LoopConfig(generations=1, rounds=1),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        eval=EvalConfig(episodes=2, sampled=True),
        merge=MergeConfig(lora_offspring="adapter", gate=False),
        progress=False,
    )
    loop.run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / ".hydra" / "config.yaml")
    return run_dir


def test_lora_run_checkpoints_name_their_own_base(lora_run):
    for adapter_config in lora_run.glob("checkpoints/*/**/adapter_config.json"):
        named = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        assert named == str(adapter_config.parent.resolve() / "base")
        assert Path(named, "model.safetensors").is_file()


def test_lora_export_loads_offline_and_after_a_move(lora_run, tmp_path, elsewhere):
    out = tmp_path / "exported"
    export([str(lora_run), str(out), "--generation", "0"])
    offspring = Partner.load(lora_run / "checkpoints" / "gen_0000" / "offspring", "offspring", LORA)
    want = logits(offspring.model, offspring.tokenizer)
    base_alone = logits(AutoModelForCausalLM.from_pretrained(out / "base"), offspring.tokenizer)
    assert not torch.allclose(base_alone, want, atol=1e-3)  # the offspring's adapter matters
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "base")
    assert torch.allclose(logits(AutoPeftModelForCausalLM.from_pretrained(out), offspring.tokenizer), want, atol=1e-5)
    assert not (out / "optimizer.pt").exists()

    moved = tmp_path / "moved"
    shutil.move(out, moved)
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "base"), moved)
    assert torch.allclose(logits(explicit, offspring.tokenizer), want, atol=1e-5)
    again = Partner.load(moved, "offspring", LORA)
    assert torch.allclose(logits(again.model, again.tokenizer), want, atol=1e-5)


def test_export_card_says_prompt_acting_and_scores(lora_run, tmp_path, elsewhere):
    out = tmp_path / "exported"
    export([str(lora_run), str(out), "--generation", "0"])
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card
    assert "## Prompt format" in card and PROMPT in card and "left, down, right, up" in card
    events = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval" and e["partner"] == "offspring" and e["generation"] == 0]
    assert {(e["env"], e["policy"]) for e in evals} == {
        (env, p) for env in ("Lake", "Line") for p in ("greedy", "sampled")
    }
    rows = re.findall(
        r"^\| (Lake|Line) \| (greedy|sampled) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$", card, re.M
    )
    assert len(rows) == 4
    for env, policy, mean_return, success, optimum, normalized, episodes in rows:
        e = next(e for e in evals if (e["env"], e["policy"]) == (env, policy))
        assert (float(mean_return), float(optimum)) == (round(e["mean_return"], 3), 1.0)
        assert (float(success), float(normalized)) == (round(e["success"], 3), round(e["normalized"], 3))
        assert episodes == ("exact" if e["exact"] else str(e["episodes"]))
    code = re.search(r"## Acting\n\n```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # the card's acting code plays one episode of the run's first env
    assert namespace["terminated"] or namespace["truncated"]
    assert isinstance(namespace["policy"].model, PeftModel)
