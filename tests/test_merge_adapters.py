"""`colearn merge` on LoRA adapter directories: merged true weight changes, folded or kept as an adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from colearn.cli.merge import main
from colearn.errors import ColearnError
from colearn.models.partner import Partner
from colearn.models.weights import dense_state

torch.set_num_threads(1)


def adapter_model(base, seed: int, targets=("q_proj", "v_proj"), **extra) -> PeftModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False, **extra)
    return get_peft_model(copy.deepcopy(base), config)


def dense(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def lora_dirs(ancestor, tmp_path_factory) -> dict[str, Path]:
    """base/ (a full model + tokenizer) and A/, B/ (peft adapters on it, naming base/ as their base model)."""
    root = tmp_path_factory.mktemp("adapters")
    model, tokenizer = ancestor
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    dirs = {"base": root / "base"}
    for name, seed, targets in (("A", 1, ("q_proj", "v_proj")), ("B", 2, ("q_proj", "o_proj"))):
        peft_model = adapter_model(model, seed, targets)
        peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def recipe(tmp_path: Path, **fields) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return str(path)


def expected_linear(lora_dirs, ancestor) -> dict[str, torch.Tensor]:
    model, _ = ancestor
    states = [dense(PeftModel.from_pretrained(copy.deepcopy(model), lora_dirs[n])) for n in ("A", "B")]
    return {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}


def test_adapters_merge_folded_into_the_base_model(lora_dirs, ancestor, tmp_path):
    out = tmp_path / "folded"
    main(
        [
            "--base",
            str(lora_dirs["base"]),
            "--recipe",
            recipe(tmp_path, method="linear"),
            "--out",
            str(out),
            str(lora_dirs["A"]),
            str(lora_dirs["B"]),
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    want = expected_linear(lora_dirs, ancestor)
    changed = [k for k in want if not torch.equal(want[k], ancestor[0].state_dict()[k])]
    assert any("o_proj" in k for k in changed) and any("v_proj" in k for k in changed)  # the union of targets
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    assert (out / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 6]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_adapters_merge_kept_as_an_adapter(lora_dirs, ancestor, tmp_path):
    out = tmp_path / "adapter"
    main(
        [
            "--base",
            str(lora_dirs["base"]),
            "--recipe",
            recipe(tmp_path, method="linear", lora_offspring="adapter"),
            "--rank",
            "4",
            "--out",
            str(out),
            str(lora_dirs["A"]),
            str(lora_dirs["B"]),
        ]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(lora_dirs["base"].resolve())
    # q_proj sums two rank-2 changes: rank 4 holds it exactly, so peft folds it to the dense merge
    got = dense(PeftModel.from_pretrained(copy.deepcopy(ancestor[0]), out))
    want = expected_linear(lora_dirs, ancestor)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)
    recorded = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert recorded["lora"]["rank"] == 4 and recorded["lora"]["truncation_error"] < 1e-5
    # rank 1 cannot: the error is the best rank-1 approximation's (Eckart-Young), recorded
    low = tmp_path / "rank1"
    main(
        [
            "--base",
            str(lora_dirs["base"]),
            "--recipe",
            recipe(tmp_path, method="linear", lora_offspring="adapter"),
            "--rank",
            "1",
            "--out",
            str(low),
            str(lora_dirs["A"]),
            str(lora_dirs["B"]),
        ]
    )
    base = ancestor[0].state_dict()
    tails = heads = 0.0
    for key in [k for k in want if want[k].dim() == 2]:
        singular = torch.linalg.svdvals((want[key] - base[key]).double())
        tails, heads = tails + float(singular[1:].square().sum()), heads + float(singular.square().sum())
    error = yaml.safe_load((low / "merge_recipe.yaml").read_text())["lora"]["truncation_error"]
    assert error == pytest.approx((tails / heads) ** 0.5, rel=1e-3) and error > 0.1


def test_colearn_lora_checkpoints_merge_relative_to_the_ancestor_adapter(ancestor, model_cfg, tmp_path):
    # colearn saves a LoRA partner as its adapter plus base/; the ancestor is an adapter too
    model, tokenizer = ancestor
    cfg = model_cfg.__class__(**{**model_cfg.__dict__, "lora_rank": 2, "lora_targets": ["q_proj", "v_proj"]})
    root = Partner("ancestor", adapter_model(model, 3), tokenizer, cfg)
    partners = [Partner(n, adapter_model(model, s), tokenizer, cfg) for n, s in (("A", 4), ("B", 5))]
    for p in [root, *partners]:
        p.save(tmp_path / p.name)
    out = tmp_path / "child"
    main(
        [
            "--base",
            str(tmp_path / "ancestor"),
            "--recipe",
            recipe(tmp_path, method="task_arithmetic", weights=[0.7, 0.4]),
            "--out",
            str(out),
            str(tmp_path / "A"),
            str(tmp_path / "B"),
        ]
    )
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    r, a, b = dense_state(root), dense_state(partners[0]), dense_state(partners[1])
    for key in r:
        want = r[key] + 0.7 * (a[key] - r[key]) + 0.4 * (b[key] - r[key])
        assert torch.allclose(got[key], want, atol=1e-5), key


def test_adapter_inputs_that_cannot_merge_are_one_line_errors(lora_dirs, ancestor, tmp_path):
    base = str(lora_dirs["base"])
    with pytest.raises(ColearnError, match="both LoRA adapter and full checkpoints"):
        main(
            [
                "--base",
                base,
                "--recipe",
                recipe(tmp_path, method="linear"),
                "--out",
                str(tmp_path / "x"),
                str(lora_dirs["A"]),
                base,
            ]
        )
    dora = adapter_model(ancestor[0], 6, use_dora=True)
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ColearnError, match="plain LoRA adapters only"):
        main(
            [
                "--base",
                base,
                "--recipe",
                recipe(tmp_path, method="linear"),
                "--out",
                str(tmp_path / "y"),
                str(lora_dirs["A"]),
                str(tmp_path / "dora"),
            ]
        )
    with pytest.raises(ColearnError, match="--rank"):
        main(
            [
                "--base",
                base,
                "--recipe",
                recipe(tmp_path, method="linear", lora_offspring="adapter"),
                "--rank",
                "0",
                "--out",
                str(tmp_path / "z"),
                str(lora_dirs["A"]),
                str(lora_dirs["B"]),
            ]
        )
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_search_over_adapters_scores_folded_candidates_and_writes_the_recipe_it_found(lora_dirs, tmp_path, capsys):
    out = tmp_path / "searched"
    main(
        [
            "--base",
            str(lora_dirs["base"]),
            "--recipe",
            recipe(tmp_path, method="evolve", base_method="linear"),
            "--out",
            str(out),
            "--search",
            "--env",
            "colearn/FrozenLake-v0",
            "--budget",
            "3",
            "--episodes",
            "2",
            str(lora_dirs["A"]),
            str(lora_dirs["B"]),
        ]
    )
    assert "held-out: uniform" in capsys.readouterr().out
    found = yaml.safe_load((tmp_path / "searched.recipe.yaml").read_text())
    assert found["method"] == "linear" and len(found["search"]["curve"]) == 3
    # the written recipe, applied without a search, gives the same folded model
    again = tmp_path / "again"
    main(
        [
            "--recipe",
            str(tmp_path / "searched.recipe.yaml"),
            "--out",
            str(again),
            str(lora_dirs["A"]),
            str(lora_dirs["B"]),
        ]
    )
    first = AutoModelForCausalLM.from_pretrained(out).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
