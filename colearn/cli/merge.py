"""`colearn merge`: merge saved checkpoints with a recipe, or search the recipe with CMA-ES first.

    colearn merge --base ANCESTOR --recipe recipe.yaml --out OUT A B [C ...]
    colearn merge --base ANCESTOR --recipe recipe.yaml --out OUT --search --env colearn/FrozenLake-v0 A B
    colearn merge --recipe mergekit.yml --out OUT

Checkpoints are Hugging Face directories with safetensors weights (one file, or shards listed
in model.safetensors.index.json, sharded alike; read and checked by `colearn.merging.merge_io`).  Tensors stream through
`colearn.merging.streaming.merge_safetensors_files` one at a time; config, generation config and
tokenizer files are copied from the base, so OUT loads with `from_pretrained`.  Partners may
instead be LoRA adapter directories on one base model (`colearn.merging.adapters`): their true weight
changes are merged, and OUT is the base model with the merge folded in, or (recipe
`lora_offspring: adapter`) an adapter of rank --rank.  The recipe YAML holds MergeConfig
fields (method, weights, density, to_ancestor, params, groups, seed, lora_offspring, ...) and
optionally `base`, the ancestor directory.  OUT/merge_recipe.yaml records what was done;
--search also writes OUT.recipe.yaml (the recipe found) and OUT.search.png (its search curve).
A mergekit YAML (`merge_method`, `base_model`, `models`, ...; `colearn.merging.mergekit_recipe`) names
its own models and merges them with mergekit's semantics; OUT/mergekit_config.yml is a copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from colearn.config import EnvSpec, EvalConfig, MergeConfig, ModelConfig, RolloutConfig
from colearn.errors import ColearnError
from colearn.merging.adapters import (
    AdapterInputs,
    base_model_dir,
    folded_states,
    is_adapter,
    write_adapter,
    write_folded,
)
from colearn.merging.adapters import read_inputs as read_adapters
from colearn.merging.evolve import search, start_recipe
from colearn.merging.merge import Recipe, merge_state_dicts
from colearn.merging.merge_io import (
    MERGEKIT_COPY,
    TOKENIZER_FILES,
    Checkpoint,
    check_architectures,
    check_output,
    check_tokenizers,
    copy_side_files,
    read_checkpoint,
    read_state,
    retype_side_files,
    staged,
    tokenizer_source,
)
from colearn.merging.mergekit_recipe import MergekitRecipe, is_mergekit, merged_tensor, parse_recipe
from colearn.merging.operators import METHODS
from colearn.merging.streaming import atomic_file, merge_safetensors_files, outputs, read_layout, retyped, write_like
from colearn.models.directories import refuse_custom_code
from colearn.models.weights import load_weights

_RECORD_KEYS = ("partners", "search", "lora")  # written into recipes for provenance, ignored when read back
SEARCH_SEED, HELDOUT_SEED = 20_000, 30_000  # episode seeds: search and held-out, disjoint from eval.seed=10000


@dataclass
class Inputs:
    base: Path  # the --base directory (the common ancestor)
    partners: list[Path]
    model: Checkpoint  # the full model whose layout OUT takes: the base, or the adapters' base model
    full: list[Checkpoint] | None  # the partners, when they are full checkpoints
    adapters: AdapterInputs | None  # the partners, when they are LoRA adapters

    def states(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Returns the ancestor's and the partners' full weights in memory (for --search)."""
        if self.adapters is None:
            return read_state(self.model), [read_state(p) for p in self.full]
        return folded_states(self.adapters, read_state(self.model))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="colearn merge", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "partners",
        nargs="*",
        metavar="CHECKPOINT",
        help="partner checkpoint directories (>= 2; none with a mergekit recipe, which names its models)",
    )
    p.add_argument("--base", help="the common ancestor's directory (default: the recipe's `base`)")
    p.add_argument(
        "--recipe",
        required=True,
        help="recipe YAML: MergeConfig fields and optionally base, or a "
        "mergekit YAML (merge_method, base_model, models, ...)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the random operators' draws (default: the recipe's seed; 0 for a mergekit recipe)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--search", action="store_true", help="search per-layer-group weights/densities with CMA-ES")
    p.add_argument("--env", action="append", default=[], metavar="ID", help="with --search: env id to score on")
    p.add_argument("--budget", type=int, help="with --search: candidate evaluations (default: search_budget)")
    p.add_argument("--episodes", type=int, default=16, help="with --search: episodes per env per evaluation")
    p.add_argument(
        "--rank",
        type=int,
        help="LoRA partners with lora_offspring: adapter: the output adapter's rank "
        "(default: the largest partner rank)",
    )
    return p


def main(argv: list[str]) -> None:
    """Runs `colearn merge`; user mistakes raise ColearnError (printed by the CLI as one line)."""
    args = parser().parse_args(argv)
    data = read_recipe(Path(args.recipe))
    if is_mergekit(data):
        merge_by_mergekit_recipe(data, args)
        return
    cfg, recipe_base = colearn_recipe(data, Path(args.recipe))
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    base_dir = args.base or recipe_base
    if base_dir is None:
        raise ColearnError("no ancestor given: pass --base DIR or put `base: DIR` in the recipe")
    if len(args.partners) < 2:
        raise ColearnError(f"colearn merge needs at least 2 partner checkpoints, got {len(args.partners)}")
    out = Path(args.out)
    check_output(out)
    inputs = read_inputs(Path(base_dir), [Path(p) for p in args.partners])
    checked_recipe(cfg, len(args.partners))
    started = time.perf_counter()
    search_record = None
    if args.search:
        cfg, search_record = searched_config(inputs, cfg, args)
        write_recipe(out.with_name(out.name + ".recipe.yaml"), cfg, inputs, search_record)
        print(f"search curve: {write_search_plot(out.with_name(out.name + '.search.png'), search_record)}")
    elif cfg.method == "evolve":
        raise ColearnError("recipe method 'evolve' searches a recipe: add --search and --env ids to score it")
    write_merge(inputs, out, cfg, search_record, args.rank)
    print(f"wrote {out} ({cfg.method}, {len(inputs.model.shapes)} tensors, {time.perf_counter() - started:.1f}s)")


def merge_by_mergekit_recipe(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Merges the models a mergekit recipe names into --out, with mergekit's semantics
    (`colearn.merging.mergekit_recipe`); the output takes the reference model's (base_model's, else models[0]'s)
    config, tokenizer and layout."""
    for flag, given in (
        ("CHECKPOINT arguments", args.partners),
        ("--base", args.base),
        ("--search", args.search),
        ("--rank", args.rank is not None),
    ):
        if given:
            raise ColearnError(
                f"{flag} do not go with a mergekit recipe, which names its models (base_model, "
                "models[].model); drop them or write a colearn recipe (method: ...)"
            )
    recipe = parse_recipe(data)
    out = Path(args.out)
    check_output(out)
    for path in recipe.inputs:
        if path.is_dir() and is_adapter(path):
            raise ColearnError(
                f"mergekit recipe model {str(path)!r} is a LoRA adapter; merge adapters with a colearn recipe"
            )
    reference = read_checkpoint(recipe.reference, "mergekit recipe")
    check_architectures(reference, [read_checkpoint(p, "mergekit recipe") for p in recipe.inputs[1:]])
    check_tokenizers(recipe.reference, recipe.inputs[1:])
    started = time.perf_counter()
    with staged(out) as tmp:
        copy_side_files(reference.path, tmp)
        write_mergekit_weights(recipe, reference, tmp, 0 if args.seed is None else args.seed)
        if recipe.output_dtype is not None:
            retype_side_files(tmp, recipe.output_dtype)
        shutil.copy2(args.recipe, tmp / MERGEKIT_COPY)
    print(
        f"wrote {out} (mergekit {recipe.method}, {len(reference.shapes)} tensors, {time.perf_counter() - started:.1f}s)"
    )


def write_mergekit_weights(recipe: MergekitRecipe, reference: Checkpoint, tmp: Path, seed: int) -> None:
    """Writes the merged weights into `tmp` file by file, with the reference's layout (floating tensors retyped to
    the recipe's output dtype)."""

    def compute(key: str, first: Any, rest: list[Any], out: Any = None, planned: Any = None) -> Any:
        return merged_tensor(key, [first, *rest], recipe, seed)

    for file in reference.files:
        layout = read_layout(reference.path / file)
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(os.fspath(p / file), framework="pt")) for p in recipe.inputs]
            with atomic_file(tmp / file) as f:
                write_like(retyped(layout, recipe.output_dtype), outputs(layout, handles[0], handles[1:], compute), f)


# --------------------------------------------------------------------------- inputs


def read_recipe(path: Path) -> dict[str, Any]:
    """Returns the recipe file's mapping (a colearn or a mergekit recipe)."""
    if not path.is_file():
        raise ColearnError(f"--recipe {str(path)!r} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ColearnError(f"--recipe {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ColearnError(f"--recipe {str(path)!r} must be a mapping of MergeConfig fields or a mergekit recipe")
    return data


def load_recipe(path: Path) -> tuple[MergeConfig, str | None]:
    """Returns the colearn recipe's MergeConfig and its `base` (None when absent); unknown keys are errors."""
    return colearn_recipe(read_recipe(path), path)


def colearn_recipe(data: dict[str, Any], path: Path) -> tuple[MergeConfig, str | None]:
    """Returns the MergeConfig and the `base` (None when absent) of a colearn recipe's mapping."""
    data = dict(data)
    known = [f.name for f in dataclasses.fields(MergeConfig)]
    for key in data:
        if key not in known and key not in ("base", *_RECORD_KEYS):
            raise ColearnError(f"recipe key {key!r} is unknown; use base or one of {known}")
    base = data.pop("base", None)
    for key in _RECORD_KEYS:
        data.pop(key, None)
    try:
        cfg = MergeConfig(**data)
    except TypeError as e:
        raise ColearnError(f"recipe {str(path)!r} has a value of the wrong type: {e}") from e
    check_method(cfg)
    return cfg, None if base is None else str(base)


def check_method(cfg: MergeConfig) -> None:
    """Raises ColearnError when the recipe's method (or evolve's base_method) is not a merge operator."""
    field, name = ("base_method", cfg.base_method) if cfg.method == "evolve" else ("method", cfg.method)
    if name not in METHODS:
        known = sorted(METHODS) + (["evolve"] if field == "method" else [])
        raise ColearnError(f"recipe {field}={name!r} is unknown; choose one of {known}")


def checked_recipe(cfg: MergeConfig, n_partners: int) -> Recipe:
    """Returns the recipe of the operator to run (merge.base_method for evolve), with equal weights when none are
    given, checked against n partners."""
    method = cfg.base_method if cfg.method == "evolve" else cfg.method
    return Recipe.from_config(cfg, n_partners, method=method).check(n_partners)


def read_inputs(base: Path, partners: list[Path]) -> Inputs:
    """Returns the checked inputs: full checkpoints of one architecture and vocabulary, or LoRA adapters on one base
    model."""
    for path, role in [(base, "--base"), *((p, "partner") for p in partners)]:
        if not path.is_dir():
            raise ColearnError(f"{role} checkpoint {str(path)!r} is not a directory")
    if any(is_adapter(p) for p in partners):
        model = read_checkpoint(base_model_dir(base), "base model")
        adapters = read_adapters(base, partners, model.shapes)
        check_tokenizers(base, partners)
        return Inputs(base, partners, model, None, adapters)
    model, full = read_checkpoint(base, "--base"), [read_checkpoint(p, "partner") for p in partners]
    check_architectures(model, full)
    check_tokenizers(base, partners)
    return Inputs(base, partners, model, full, None)


# --------------------------------------------------------------------------- output


def write_merge(
    inputs: Inputs, out: Path, cfg: MergeConfig, search_record: dict[str, Any] | None = None, rank: int | None = None
) -> None:
    """Writes the merged checkpoint to `out` (via a sibling temp dir, renamed when complete)."""
    recipe = checked_recipe(cfg, len(inputs.partners))
    adapter_out = cfg.lora_offspring == "adapter"
    if adapter_out and inputs.adapters is None:
        raise ColearnError("recipe lora_offspring=adapter needs LoRA adapter partners; these are full checkpoints")
    if adapter_out:
        rank = max(a.rank for a in inputs.adapters.partners) if rank is None else rank
        if rank < 1:
            raise ColearnError(f"--rank={rank} must be >= 1 (the output adapter's LoRA rank)")
    record: dict[str, Any] = {}
    with staged(out) as tmp:
        if adapter_out:
            record["lora"] = {"rank": rank, "truncation_error": write_adapter(inputs.adapters, recipe, tmp, rank)}
        else:
            copy_side_files(inputs.model.path, tmp)
            write_weights(inputs, recipe, tmp)
        source = tokenizer_source([tmp, inputs.base, *inputs.partners, inputs.model.path])
        if source is not None and source != tmp:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        write_recipe(
            tmp / "merge_recipe.yaml", dataclasses.replace(cfg, weights=recipe.weights), inputs, search_record, record
        )


def write_weights(inputs: Inputs, recipe: Recipe, tmp: Path) -> None:
    """Writes the merged full weights into `tmp`, shard by shard, with the base model's layout."""
    if inputs.adapters is not None:
        write_folded(inputs.adapters, recipe, tmp, inputs.model.files)
        return
    recipe.check_groups_match(inputs.model.shapes)
    for file, keys in inputs.model.files.items():
        # a shard need not hold every layer group the recipe names
        merge_safetensors_files(
            inputs.model.path / file, [p.path / file for p in inputs.full], tmp / file, recipe.restricted_to(keys)
        )


def write_recipe(
    path: Path,
    cfg: MergeConfig,
    inputs: Inputs,
    search_record: dict[str, Any] | None,
    record: dict[str, Any] | None = None,
) -> None:
    """Writes the recipe YAML (loadable again with --recipe) with the inputs, the search record and `record`."""
    data: dict[str, Any] = {
        "base": str(inputs.base.resolve()),
        **_recipe_fields(cfg),
        "partners": [str(p.resolve()) for p in inputs.partners],
        **(record or {}),
    }
    if search_record is not None:
        data["search"] = search_record
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _recipe_fields(cfg: MergeConfig) -> dict[str, Any]:
    fields = ("method", "weights", "density", "to_ancestor", "params", "groups", "seed", "lora_offspring")
    return {name: getattr(cfg, name) for name in fields}


# --------------------------------------------------------------------------- search


def searched_config(inputs: Inputs, cfg: MergeConfig, args: argparse.Namespace) -> tuple[MergeConfig, dict[str, Any]]:
    """Returns the recipe CMA-ES found (as a MergeConfig of the searched operator) and the search record.

    Candidates are merged in memory into one reusable model and scored on --episodes episodes
    per env (seeds from 20000); the winner and the uniform recipe are re-scored on held-out
    episodes (seeds from 30000).
    """
    # acting in envs needs gymnasium (and the candidate transformers): loaded only for --search
    from colearn.experience.evaluate import return_scorer
    from colearn.experience.rollout import env_info

    if not args.env:
        raise ColearnError("--search needs --env ids to score candidates, e.g. --env colearn/FrozenLake-v0")
    if args.budget is not None:
        if args.budget < 1:
            raise ColearnError(f"--budget={args.budget} must be >= 1")
        cfg = dataclasses.replace(cfg, search_budget=args.budget)
    if args.episodes < 1:
        raise ColearnError(f"--episodes={args.episodes} must be >= 1")
    suite = [EnvSpec(env_id) for env_id in args.env]
    for spec in suite:
        env_info(spec)
    candidate = candidate_partner(inputs)
    ancestor, states = inputs.states()
    eval_cfg = EvalConfig(episodes=args.episodes)
    on_search = return_scorer(suite, eval_cfg, RolloutConfig(), SEARCH_SEED)
    on_heldout = return_scorer(suite, eval_cfg, RolloutConfig(), HELDOUT_SEED)

    def scored(state: dict[str, Any], scorer: Callable[[Any], float]) -> float:
        try:
            load_weights(candidate.model, state)
        except ValueError as e:
            raise ColearnError(f"--search cannot load the merged tensors into the base's model class: {e}") from e
        return float(scorer(candidate))

    print(
        f"search: {cfg.search_budget} candidates on {', '.join(args.env)} ({args.episodes} episodes per env "
        "each), then the best and the uniform recipe on held-out episodes",
        flush=True,
    )
    result = search(ancestor, states, lambda state: scored(state, on_search), cfg)
    uniform = scored(merge_state_dicts(ancestor, states, start_recipe(cfg, len(states))), on_heldout)
    best = scored(merge_state_dicts(ancestor, states, result.recipe), on_heldout)
    print(
        f"search: {cfg.search_budget} evaluations on {args.env}; uniform {result.uniform_fitness:.4f} -> best "
        f"{result.fitness:.4f} on search episodes; held-out: uniform {uniform:.4f}, best {best:.4f}"
    )
    record = {
        "envs": list(args.env),
        "episodes": args.episodes,
        "budget": cfg.search_budget,
        "fitness": result.fitness,
        "uniform_fitness": result.uniform_fitness,
        "heldout": best,
        "heldout_uniform": uniform,
        "curve": result.curve,
    }
    found = result.recipe
    return dataclasses.replace(
        cfg, method=found.method, weights=found.weights, density=found.density, groups=found.groups
    ), record


def write_search_plot(path: Path, record: dict[str, Any]) -> Path:
    """Writes the search curve (candidates, best so far, held-out scores) as a PNG at `path`; returns `path`."""
    from colearn.analysis import plots  # matplotlib: loaded only for --search
    from colearn.analysis.report import save_png

    save_png(plots.search_figure({f"search on {', '.join(record['envs'])}": record}), path)
    return path


def candidate_partner(inputs: Inputs) -> Any:
    """Returns a Partner over the base model (and the first tokenizer among the inputs) to load candidates into."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # loaded only for --search

    from colearn.models.partner import Partner

    source = tokenizer_source([inputs.base, *inputs.partners, inputs.model.path])
    if source is None:
        raise ColearnError("--search needs a tokenizer to act with; none of the inputs has tokenizer files")
    for path in (inputs.model.path, source):
        refuse_custom_code(path, "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(inputs.model.path, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Partner("candidate", model, tokenizer, ModelConfig(source=str(inputs.model.path)))
