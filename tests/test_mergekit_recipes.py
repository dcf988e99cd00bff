"""Tests of mergekit recipes in `colearn merge` (colearn.merging.mergekit_recipe, colearn.merging.mergekit_methods) and
of the merge command's start-up imports: a tiny pair on disk, outputs compared with mergekit's formulas computed by
hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from colearn.cli.merge import main
from colearn.errors import ColearnError
from colearn.merging import mergekit_methods
from colearn.merging.merge import tensor_seed
from colearn.merging.mergekit_recipe import parse_recipe

HEAVY = ("transformers", "gymnasium", "datasets", "hydra", "peft", "trl")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """Directories base, A, B: tensors w (3, 4), v (5,) in float32 and an int64 buffer; A and B differ from the base
    by deltas of equal scale, so their signs often disagree."""
    root = tmp_path_factory.mktemp("pair")
    generator = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(3, 4, generator=generator),
        "v": torch.randn(5, generator=generator),
        "step": torch.tensor([7]),
    }
    dirs = {}
    for name in ("base", "A", "B"):
        state = (
            base
            if name == "base"
            else {
                k: (t + torch.randn(t.shape, generator=generator) if t.is_floating_point() else t)
                for k, t in base.items()
            }
        )
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        dirs[name] = root / name
    return dirs


def merged(pair: dict[str, Path], tmp_path: Path, recipe: dict, *extra: str) -> dict[str, torch.Tensor]:
    """Runs `colearn merge --recipe <recipe with model names replaced by paths>` and returns the output's tensors."""

    def path(value):
        return str(pair[value]) if value in pair else value

    recipe = dict(recipe)
    if "base_model" in recipe:
        recipe["base_model"] = path(recipe["base_model"])
    recipe["models"] = [{**m, "model": path(m["model"])} for m in recipe.get("models", [])]
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    main(["--recipe", str(tmp_path / "mk.yml"), "--out", str(out), *extra])
    return load_file(out / "model.safetensors")


def tensors(pair: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    return load_file(pair[name] / "model.safetensors")


def flat(t: torch.Tensor) -> list[float]:
    return t.double().flatten().tolist()


# --------------------------------------------------------------------------- mergekit's formulas, by hand


def linear_by_hand(models: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    values = [sum(w * x for w, x in zip(weights, xs)) for xs in zip(*(flat(m) for m in models))]
    return torch.tensor([v / sum(weights) if normalize else v for v in values]).view_as(models[0])


def slerp_by_hand(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = flat(v0), flat(v1)
    norm_a, norm_b = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    dot = sum(x / norm_a * y / norm_b for x, y in zip(a, b))
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.tensor([s0 * x + s1 * y for x, y in zip(a, b)]).view_as(v0)


def top_magnitudes(delta: list[float], density: float) -> list[float]:
    keep = set(sorted(range(len(delta)), key=lambda i: -abs(delta[i]))[: int(density * len(delta))])
    return [d if i in keep else 0.0 for i, d in enumerate(delta)]


def l1_rescaled(delta: list[float], kept: list[float]) -> list[float]:
    return [k * sum(map(abs, delta)) / sum(map(abs, kept)) for k in kept]


def elected_by_hand(
    base: torch.Tensor, deltas: list[list[float]], weights: list[float], normalize: bool
) -> torch.Tensor:
    """base + the weighted deltas whose sign is the sign of their sum (+ at 0), over the sum of their weights."""
    out = []
    for i, b in enumerate(flat(base)):
        weighted = [w * d[i] for w, d in zip(weights, deltas)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [j for j, x in enumerate(weighted) if x * sign > 0]
        mixed = sum(weighted[j] for j in agree)
        divisor = sum(weights[j] for j in agree) or 1.0
        out.append(b + (mixed / divisor if normalize else mixed))
    return torch.tensor(out).view_as(base)


def deltas_of(pair: dict[str, Path], key: str) -> tuple[torch.Tensor, list[list[float]]]:
    base = tensors(pair, "base")[key]
    return base, [[x - b for x, b in zip(flat(tensors(pair, n)[key]), flat(base))] for n in ("A", "B")]


# --------------------------------------------------------------------------- methods


def test_linear_is_the_weighted_mean_of_the_models_themselves(pair, tmp_path):
    out = merged(
        pair,
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": "A", "parameters": {"weight": 2.0}}, {"model": "B", "parameters": {"weight": 1.0}}],
        },
    )
    for key in ("w", "v"):
        want = linear_by_hand([tensors(pair, "A")[key], tensors(pair, "B")[key]], [2.0, 1.0])
        torch.testing.assert_close(out[key], want.float(), atol=1e-6, rtol=0)
    assert torch.equal(out["step"], torch.tensor([7]))


def test_linear_without_normalize_sums_and_takes_the_base_as_a_model(pair, tmp_path):
    out = merged(
        pair,
        tmp_path,
        {
            "merge_method": "linear",
            "base_model": "base",
            "parameters": {"normalize": False, "weight": 0.5},
            "models": [{"model": "A"}, {"model": "B", "parameters": {"weight": 0.25}}],
        },
    )
    want = linear_by_hand([tensors(pair, n)["w"] for n in ("base", "A", "B")], [0.5, 0.5, 0.25], normalize=False)
    torch.testing.assert_close(out["w"], want.float(), atol=1e-6, rtol=0)


def test_slerp_without_a_base_interpolates_the_two_models_full_weights(pair, tmp_path):
    out = merged(
        pair, tmp_path, {"merge_method": "slerp", "parameters": {"t": 0.3}, "models": [{"model": "A"}, {"model": "B"}]}
    )
    for key in ("w", "v"):
        want = slerp_by_hand(0.3, tensors(pair, "A")[key], tensors(pair, "B")[key])
        torch.testing.assert_close(out[key], want.float(), atol=1e-6, rtol=0)


def test_slerp_with_a_base_model_starts_from_it(pair, tmp_path):
    out = merged(
        pair,
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": "B",
            "parameters": {"t": 0.8},
            "models": [{"model": "A"}, {"model": "B"}],
        },
    )
    want = slerp_by_hand(0.8, tensors(pair, "B")["w"], tensors(pair, "A")["w"])
    torch.testing.assert_close(out["w"], want.float(), atol=1e-6, rtol=0)


def test_ties_elects_signs_on_weighted_task_vectors_and_divides_by_the_agreeing_weights(pair, tmp_path):
    weights, densities = [1.0, 0.3], [0.5, 0.75]
    out = merged(
        pair,
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "base"},
                {"model": "A", "parameters": {"weight": weights[0], "density": densities[0]}},
                {"model": "B", "parameters": {"weight": weights[1], "density": densities[1]}},
            ],
        },
    )
    for key in ("w", "v"):
        base, deltas = deltas_of(pair, key)
        trimmed = [top_magnitudes(d, density) for d, density in zip(deltas, densities)]
        want = elected_by_hand(base, trimmed, weights, normalize=True)
        torch.testing.assert_close(out[key], want.float(), atol=1e-6, rtol=0)
    # colearn's own ties (count division, unweighted election) gives another tensor here
    (tmp_path / "colearn.yaml").write_text(yaml.safe_dump({"method": "ties", "weights": weights, "density": 0.5}))
    main(
        [
            "--base",
            str(pair["base"]),
            "--recipe",
            str(tmp_path / "colearn.yaml"),
            "--out",
            str(tmp_path / "own"),
            str(pair["A"]),
            str(pair["B"]),
        ]
    )
    assert not torch.allclose(load_file(tmp_path / "own" / "model.safetensors")["w"], out["w"], atol=1e-3)


def test_dare_ties_draws_seeded_masks_rescales_to_the_l1_norm_and_elects_signs(pair, tmp_path):
    weights, densities, seed = [1.0, 0.5], [0.5, 0.7], 11
    out = merged(
        pair,
        tmp_path,
        {
            "merge_method": "dare_ties",
            "base_model": "base",
            "parameters": {"normalize": True},
            "models": [
                {"model": "A", "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": "B", "parameters": {"weight": 0.5, "density": 0.7}},
            ],
        },
        "--seed",
        str(seed),
    )
    for key in ("w", "v"):
        base, deltas = deltas_of(pair, key)
        generator = torch.Generator().manual_seed(tensor_seed(seed, key))
        kept = []
        for delta, density in zip(deltas, densities):
            mask = flat(torch.bernoulli(torch.full(base.shape, density), generator=generator))
            kept.append(l1_rescaled(delta, [d * m for d, m in zip(delta, mask)]))
        want = elected_by_hand(base, kept, weights, normalize=True)
        torch.testing.assert_close(out[key], want.float(), atol=1e-6, rtol=0)
    again = merged(
        pair,
        tmp_path / "again",
        {
            "merge_method": "dare_ties",
            "base_model": "base",
            "models": [
                {"model": "A", "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": "B", "parameters": {"weight": 0.5, "density": 0.7}},
            ],
        },
        "--seed",
        str(seed),
    )
    assert not torch.allclose(again["w"], out["w"])  # normalize defaults to false for dare_ties, as in mergekit


def test_mergekit_defaults_follow_its_registry(pair):
    models = [{"model": str(pair["A"]), "parameters": {"weight": 1.0}}]
    normalize = {
        m: parse_recipe(
            {"merge_method": m, "base_model": str(pair["base"]), "parameters": {"weight": 1.0}, "models": models}
        ).params["normalize"]
        for m in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
    }
    assert normalize == {
        "linear": True,
        "task_arithmetic": False,
        "ties": True,
        "dare_ties": False,
        "dare_linear": False,
    }


def test_dtype_sets_the_output_tensors_and_config(pair, tmp_path):
    recipe = {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "models": [{"model": "A", "parameters": {"weight": 1.0}}, {"model": "B", "parameters": {"weight": 1.0}}],
    }
    out = merged(pair, tmp_path, recipe)
    want = linear_by_hand([tensors(pair, "A")["w"], tensors(pair, "B")["w"]], [1.0, 1.0]).float().bfloat16()
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], want)
    assert out["step"].dtype == torch.int64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["merge_method"] == "linear"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mergekit_methods_run_on_the_inputs_device():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=generator)
    models = [base + torch.randn(64, 32, generator=generator) for _ in range(2)]
    on_gpu = [base.cuda(), *(m.cuda() for m in models)]
    for sparsification, consensus in ((None, False), ("magnitude", True)):
        cpu = mergekit_methods.generalized_task_arithmetic(
            base, models, [1.0, 0.5], [0.5, 0.7], sparsification, consensus, normalize=True, rescale=False
        )
        gpu = mergekit_methods.generalized_task_arithmetic(
            on_gpu[0], on_gpu[1:], [1.0, 0.5], [0.5, 0.7], sparsification, consensus, normalize=True, rescale=False
        )
        assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    dare = mergekit_methods.generalized_task_arithmetic(
        on_gpu[0],
        on_gpu[1:],
        [1.0, 0.5],
        [0.5, 0.7],
        "random",
        True,
        normalize=False,
        rescale=True,
        generator=torch.Generator(device="cuda").manual_seed(1),
    )
    assert dare.device.type == "cuda" and torch.isfinite(dare).all()
    slerp = mergekit_methods.slerp(0.3, on_gpu[1], on_gpu[2])
    assert torch.allclose(slerp.cpu(), mergekit_methods.slerp(0.3, models[0], models[1]), atol=1e-5)


# --------------------------------------------------------------------------- what is not supported


@pytest.mark.parametrize(
    "change, key",
    [
        ({"slices": [{"sources": []}]}, "'slices'"),
        ({"tokenizer_source": "union"}, "'tokenizer_source'"),
        ({"merge_method": "della"}, "'merge_method'"),
        ({"models": [{"model": "A", "parameters": {"weight": [0.0, 1.0]}}]}, "'models[0].parameters.weight'"),
        ({"parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}, "'parameters.density'"),
        ({"models": [{"model": "A", "parameters": {"weight": 1.0, "gamma": 0.1}}]}, "'models[0].parameters.gamma'"),
        ({"models": [{"model": "A+some/lora", "parameters": {"weight": 1.0}}]}, "'models[0].model'"),
        ({"models": [{"model": "A", "layer_range": [0, 2]}]}, "'models[0].layer_range'"),
        ({"base_model": None}, "base_model"),
    ],
)
def test_unsupported_mergekit_features_are_one_line_errors_naming_the_key(pair, tmp_path, change, key):
    recipe = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "A", "parameters": {"weight": 1.0}}],
        **change,
    }
    with pytest.raises(ColearnError) as error:
        merged(pair, tmp_path, recipe)
    assert key in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_mergekit_recipe_takes_no_checkpoint_arguments(pair, tmp_path):
    (tmp_path / "mk.yml").write_text(
        yaml.safe_dump(
            {
                "merge_method": "slerp",
                "parameters": {"t": 0.5},
                "models": [{"model": str(pair["A"])}, {"model": str(pair["B"])}],
            }
        )
    )
    with pytest.raises(ColearnError, match="CHECKPOINT arguments do not go with a mergekit recipe"):
        main(["--recipe", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "o"), str(pair["A"]), str(pair["B"])])


# --------------------------------------------------------------------------- start-up


def test_colearn_merge_runs_without_importing_the_training_stack(pair, tmp_path, tokenizer):
    """`colearn merge` (the console entry point, tokenizer files compared) leaves transformers, gymnasium, datasets
    and hydra unimported; a bad mergekit key exits 2 with one line."""
    for name in ("base", "A", "B"):
        tokenizer.save_pretrained(tmp_path / name)
        for f in pair[name].iterdir():
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
    recipe = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0, "density": 0.5}} for n in ("A", "B")],
    }
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({**recipe, "tokenizer_source": "union"}))
    script = (
        "import sys; from colearn.cli.main import main; sys.argv = ['colearn', 'merge', *sys.argv[1:]]\n"
        "try:\n    main()\nfinally:\n"
        f"    print('loaded:', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, "--recipe", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout and (tmp_path / "out" / "tokenizer.json").is_file()
    done = subprocess.run(
        [sys.executable, "-c", script, "--recipe", str(tmp_path / "bad.yml"), "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "loaded: []" in done.stdout
    assert done.stderr.strip().splitlines() == [
        (
            "colearn: error: mergekit key 'tokenizer_source' is not supported by colearn merge: tokenizer merging (the "
            "output takes the base model's tokenizer)"
        )
    ]
