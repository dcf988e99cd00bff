"""`colearn export RUN_DIR [--generation N] OUT`: a deployable Hugging Face directory with a model card.

An offspring that is a mixture (merge.fallback=mixture, see `colearn.mixture`) is exported as that mixture
directory: mixture.json and one Hugging Face directory per member, with a card giving the routing table."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from colearn.errors import ColearnError
from colearn.mixture import UNMAPPED, is_mixture, read_manifest


def chosen_generation(run_dir: Path, generation: int | None) -> int:
    """Returns the generation to export: the one asked for, else the deployed one (deployed.json). With
    neither, raises ColearnError naming the generations there are: no offspring passed the promotion gate,
    so which one to ship is the user's call."""
    if generation is not None:
        return generation
    deployed = run_dir / "deployed.json"
    if deployed.is_file():
        return int(json.loads(deployed.read_text(encoding="utf-8"))["generation"])
    gens = [int(d.parent.name.removeprefix("gen_")) for d in sorted(run_dir.glob("checkpoints/gen_*/offspring"))]
    if not gens:
        raise ColearnError(f"{str(run_dir)!r} has no checkpoints/gen_*/offspring; has a generation finished?")
    raise ColearnError(f"{str(run_dir)!r} has no deployed.json (no offspring passed the promotion gate); pick one "
                       f"with --generation N (saved: {', '.join(map(str, gens))})")


def check_output(out: Path) -> None:
    """Raises ColearnError when `out` exists and is not an empty directory: export never overwrites files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ColearnError(f"OUT {str(out)!r} already exists and is not an empty directory; choose a new one")


def lineage_lines(node: dict[str, Any] | None) -> list[str]:
    """Returns the card's lineage, scores per env and recipe sections (markdown lines)."""
    if node is None:
        return ["No lineage record was found for this generation."]
    lines = ["## Lineage", "", f"- parents: {', '.join(node['parents'])}", f"- ancestor: {node['ancestor']}",
             f"- environment steps so far: {node.get('env_steps')}", "", "## Scores (normalized return; 1.0 = optimal)",
             "", "| env | offspring | " + " | ".join(node["parent_scores"]) + " |",
             "|---|---|" + "---|" * len(node["parent_scores"])]
    for env, score in node["scores"].items():
        parents = " | ".join(f"{ps.get(env, float('nan')):.3f}" for ps in node["parent_scores"].values())
        lines.append(f"| {env} | {score:.3f} | {parents} |")
    return lines + ["", "## Recipe", "", "```json", json.dumps(node["recipe"], indent=2, default=str), "```"]


def model_card(node: dict[str, Any] | None, generation: int, run_dir: Path) -> str:
    """Returns the README.md of the exported model: lineage, scores per env, the recipe that made it."""
    lines = ["---", "library_name: transformers", "tags: [colearn]", "---", "",
             f"# colearn offspring, generation {generation}", "", f"Exported from run `{run_dir}`.", ""]
    return "\n".join(lines + lineage_lines(node)) + "\n"


def mixture_card(node: dict[str, Any] | None, generation: int, run_dir: Path, manifest: dict[str, Any],
                 out: Path) -> str:
    """Returns the README.md of an exported mixture: what it is, its routing table (env -> member), how to
    load it, then lineage, scores and recipe as for one model."""
    reason = (node or {}).get("recipe", {}).get("reason")
    why = f"merge.fallback=mixture: {reason}" if reason else "merge.fallback=mixture"
    lines = ["---", "library_name: transformers", "tags: [colearn, mixture]", "---", "",
             f"# colearn offspring, generation {generation}: a mixture of {', '.join(manifest['members'])}", "",
             f"Exported from run `{run_dir}`.", "",
             f"This offspring is not one model. The partners were not averaged ({why}); they are kept side by "
             "side and each env is routed to the member best on it. `mixture.json` holds the routing table; each "
             "member is a Hugging Face directory under `members/<name>/`.", ""]
    lines += routing_lines(manifest) + loading_lines(manifest, out, run_dir) + lineage_lines(node)
    return "\n".join(lines) + "\n"


def routing_lines(manifest: dict[str, Any]) -> list[str]:
    """Returns the card's routing section: one row per env and what decides elsewhere."""
    rows = [f"| {env} | {member} |" for env, member in manifest["env_map"].items()]
    elsewhere = f"In an env not in this table, {UNMAPPED}."
    return ["## Routing", "", "| env | member |", "|---|---|", *rows, "", elsewhere, ""]


def loading_lines(manifest: dict[str, Any], out: Path, run_dir: Path) -> list[str]:
    """Returns the card's section on loading the mixture (colearn.mixture.load_mixture) or one member alone."""
    env = next(iter(manifest["env_map"]), "ENV")
    code = ["from pathlib import Path", "", "import torch", "from colearn.mixture import load_mixture",
            "from colearn.resume import run_config", "",
            f'policy = load_mixture({str(out)!r}, run_config(Path({str(run_dir)!r})).model, "cpu")',
            f"act = policy.in_env({env!r}).act  # the env's name picks the member that decides",
            "actions = act(observations, legal_actions, greedy=True, generator=torch.Generator())"]
    member = f"{out}/members/{manifest['members'][0]}"
    return ["## Loading", "", "```python", *code, "```", "",
            "`load_mixture` needs the run's model config (`run_config`), or a `colearn.config.ModelConfig` with the "
            "same prompt_template, action_prefix and dtype. One member alone loads with "
            f'`AutoModelForCausalLM.from_pretrained("{member}")`.', ""]


def copy_with_card(source: Path, out: Path, card: str) -> None:
    """Copies the checkpoint at `source` to `out` (absent or an empty directory) without optimizer state, with
    `card` as README.md, written aside (in a fresh hidden directory beside `out`) and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / "export"
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("optimizer.pt"))  # at every depth
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (check_output): removing it cannot lose a file
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="colearn export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--generation", type=int, default=None,
                        help="default: the deployed generation (deployed.json); needed when there is none")
    args = parser.parse_args(argv)
    check_output(args.out)
    gen = chosen_generation(args.run_dir, args.generation)
    source = args.run_dir / "checkpoints" / f"gen_{gen:04d}" / "offspring"
    if not source.is_dir():
        raise ColearnError(f"generation {gen} has no checkpoint at {str(source)!r}; pick another --generation")
    lineage_path = args.run_dir / "lineage.json"
    lineage = json.loads(lineage_path.read_text(encoding="utf-8")) if lineage_path.is_file() else []
    node = next((n for n in lineage if n["generation"] == gen), None)
    if is_mixture(source):
        manifest = read_manifest(source)
        copy_with_card(source, args.out, mixture_card(node, gen, args.run_dir, manifest, args.out))
        routes = ", ".join(f"{env} -> {member}" for env, member in manifest["env_map"].items())
        print(f"exported generation {gen} to {args.out}: a mixture of {', '.join(manifest['members'])} "
              f"routed by env ({routes}); load it with colearn.mixture.load_mixture")
        return
    copy_with_card(source, args.out, model_card(node, gen, args.run_dir))
    print(f"exported generation {gen} to {args.out}")
