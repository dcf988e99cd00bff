"""Tests of `colearn merge` (colearn.cli.merge): real checkpoints on disk, in-process and once as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from colearn.cli.merge import load_recipe, main
from colearn.errors import ColearnError
from colearn.merging.merge import Recipe, merge_state_dicts
from colearn.models.partner import Partner

torch.set_num_threads(1)


def perturbed(partner: Partner, name: str, seed: int) -> Partner:
    child = partner.clone(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in child.model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return child


@pytest.fixture(scope="module")
def ckpts(ancestor, model_cfg, tmp_path_factory) -> dict[str, Path]:
    """Directories base, A, B (single file) and base_s, A_s, B_s (the same weights in shards)."""
    root = tmp_path_factory.mktemp("ckpts")
    model, tokenizer = ancestor
    base = Partner("ancestor", model, tokenizer, model_cfg)
    dirs = {}
    for name, partner in (("base", base), ("A", perturbed(base, "A", 1)), ("B", perturbed(base, "B", 2))):
        partner.save(root / name)
        partner.model.save_pretrained(root / f"{name}_s", max_shard_size="20KB")
        tokenizer.save_pretrained(root / f"{name}_s")
        dirs[name], dirs[f"{name}_s"] = root / name, root / f"{name}_s"
    return dirs


def recipe(tmp_path: Path, **fields) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return str(path)


def expected(ckpts: dict[str, Path], **recipe_fields) -> dict[str, torch.Tensor]:
    states = [load_file(ckpts[n] / "model.safetensors") for n in ("base", "A", "B")]
    return merge_state_dicts(states[0], states[1:], Recipe(**recipe_fields))


def test_merge_writes_a_checkpoint_that_loads_generates_and_equals_the_in_memory_merge(ckpts, tmp_path, capsys):
    out = tmp_path / "child"
    main(
        [
            "--base",
            str(ckpts["base"]),
            "--recipe",
            recipe(tmp_path, method="ties", weights=[1.0, 0.8], density=0.5, seed=3),
            "--out",
            str(out),
            str(ckpts["A"]),
            str(ckpts["B"]),
        ]
    )
    assert f"wrote {out} (ties" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    want = expected(ckpts, method="ties", weights=[1.0, 0.8], density=0.5, seed=3)
    state = model.state_dict()
    for key, tensor in want.items():
        assert torch.equal(state[key], tensor), key
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives (config copied from the base)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(ckpts["base"]).get_vocab()
    ids = torch.tensor([tokenizer("SFFF\nAction:")["input_ids"]])
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)
    written = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert written["method"] == "ties" and written["density"] == 0.5
    assert written["partners"] == [str(ckpts["A"].resolve()), str(ckpts["B"].resolve())]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dir left


def test_sharded_checkpoints_merge_shard_by_shard_like_a_single_file(ckpts, tmp_path):
    files = sorted(p.name for p in ckpts["base_s"].glob("*.safetensors"))
    assert len(files) > 2 and (ckpts["base_s"] / "model.safetensors.index.json").is_file()
    groups = {"embed": {"weights": [1.0, 0.0]}}  # matches a group in one shard only
    out = tmp_path / "child"
    main(
        [
            "--base",
            str(ckpts["base_s"]),
            "--recipe",
            recipe(tmp_path, method="linear", groups=groups),
            "--out",
            str(out),
            str(ckpts["A_s"]),
            str(ckpts["B_s"]),
        ]
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = expected(ckpts, method="linear", weights=[0.5, 0.5], groups=groups)
    assert all(torch.equal(state[k], v) for k, v in want.items())


def test_the_base_can_come_from_the_recipe(ckpts, tmp_path):
    out = tmp_path / "child"
    main(
        [
            "--recipe",
            recipe(tmp_path, method="linear", base=str(ckpts["base"])),
            "--out",
            str(out),
            str(ckpts["A"]),
            str(ckpts["B"]),
        ]
    )
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def other_tokenizer_ckpt(ckpts, tmp_path_factory) -> Path:
    """Partner A's weights with a tokenizer whose token 'Action:' was renamed."""
    path = tmp_path_factory.mktemp("tok") / "A_tok"
    AutoModelForCausalLM.from_pretrained(ckpts["A"]).save_pretrained(path)
    tokenizer_json = (ckpts["A"] / "tokenizer.json").read_text().replace('"Action:"', '"Act:"')
    for f in ckpts["A"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (path / f.name).write_text(
                f.read_text().replace('"Action:"', '"Act:"') if f.suffix == ".json" else f.read_text()
            )
    (path / "tokenizer.json").write_text(tokenizer_json)
    return path


@pytest.mark.parametrize(
    "fields, argv_extra, message",
    [
        ({"method": "tiess"}, [], r"^merge\.method: 'tiess' is not one of linear, .*\bties\b.*, none, evolve$"),
        ({"method": "ties", "density": 1.5}, [], r"merge.density=1.5 must be in \(0, 1\]"),
        ({"method": "linear", "weights": [0.2, 0.3, 0.5]}, [], r"merge.weights has 3 entries for 2 partners"),
        ({"method": "linear", "weights": [0.0, 0.0]}, [], r"are all zero"),
        ({"method": "linear", "densty": 0.5}, [], r"recipe key 'densty' is unknown"),
        ({"method": "evolve"}, [], r"add --search and --env"),
        ({"method": "ties"}, ["--search"], r"--search needs --env ids"),
        # the searched operator: an operator, never none or evolve
        (
            {"method": "evolve", "base_method": "nope"},
            [],
            r"^merge\.base_method: 'nope' is not one of linear, .*\bties\b.*, "
            r"model_stock$",
        ),
    ],
)
def test_bad_recipes_are_one_line_user_errors(ckpts, tmp_path, fields, argv_extra, message):
    with pytest.raises(ColearnError, match=message):
        main(
            [
                "--base",
                str(ckpts["base"]),
                "--recipe",
                recipe(tmp_path, **fields),
                "--out",
                str(tmp_path / "o"),
                str(ckpts["A"]),
                str(ckpts["B"]),
                *argv_extra,
            ]
        )
    assert not (tmp_path / "o").exists()


def test_bad_inputs_are_one_line_user_errors(ckpts, tmp_path, other_tokenizer_ckpt):
    args = ["--base", str(ckpts["base"]), "--recipe", recipe(tmp_path, method="linear"), "--out"]
    with pytest.raises(ColearnError, match=r"partner checkpoint '.*missing' is not a directory"):
        main([*args, str(tmp_path / "o"), str(ckpts["A"]), str(tmp_path / "missing")])
    with pytest.raises(ColearnError, match=r"token id \d+ is 'Act:' there but 'Action:' in the base"):
        main([*args, str(tmp_path / "o"), str(ckpts["A"]), str(other_tokenizer_ckpt)])
    with pytest.raises(ColearnError, match="sharded differently"):
        main([*args, str(tmp_path / "o"), str(ckpts["A"]), str(ckpts["B_s"])])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ColearnError, match="already exists"):
        main([*args, str(tmp_path / "full"), str(ckpts["A"]), str(ckpts["B"])])


def test_mismatched_architecture_exits_2_with_one_line_naming_the_tensor(ckpts, tmp_path, model_cfg, tokenizer):
    from colearn.models.build import build_tiny_model

    wide = build_tiny_model(model_cfg.__class__(**{**model_cfg.__dict__, "intermediate_size": 48}), tokenizer, 0)
    wide.save_pretrained(tmp_path / "wide")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "colearn.cli",
            "merge",
            "--base",
            str(ckpts["base"]),
            "--recipe",
            recipe(tmp_path, method="linear"),
            "--out",
            str(tmp_path / "o"),
            str(ckpts["A"]),
            str(tmp_path / "wide"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("colearn: error: ")
    assert "'model.layers.0.mlp.down_proj.weight' has shape (32, 48) but (32, 64) in the base" in lines[0]
    assert not (tmp_path / "o").exists()


def test_search_writes_the_best_recipe_next_to_a_loadable_output(ckpts, tmp_path, capsys):
    out = tmp_path / "child"
    main(
        [
            "--base",
            str(ckpts["base"]),
            "--recipe",
            recipe(tmp_path, method="evolve", base_method="ties", seed=1),
            "--out",
            str(out),
            "--search",
            "--env",
            "colearn/FrozenLake-v0",
            "--budget",
            "4",
            "--episodes",
            "2",
            str(ckpts["A"]),
            str(ckpts["B"]),
        ]
    )
    printed = capsys.readouterr().out
    assert "held-out: uniform" in printed
    plot = tmp_path / "child.search.png"
    assert f"search curve: {plot}" in printed
    image = Image.open(plot)
    assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 20  # drawn on, not a blank canvas
    best = tmp_path / "child.recipe.yaml"
    cfg, base = load_recipe(best)
    assert cfg.method == "ties" and base == str(ckpts["base"].resolve())
    record = yaml.safe_load(best.read_text())["search"]
    assert len(record["curve"]) == 4 and record["fitness"] == max(c["fitness"] for c in record["curve"])
    assert 0.0 <= record["heldout"] <= 1.0 and record["envs"] == ["colearn/FrozenLake-v0"]
    # The written recipe reproduces the searched offspring through the plain (no-search) path.
    again = tmp_path / "again"
    main(["--recipe", str(best), "--out", str(again), str(ckpts["A"]), str(ckpts["B"])])
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert AutoModelForCausalLM.from_pretrained(out) is not None
