"""`colearn export RUN_DIR [--generation N] OUT`: a deployable Hugging Face directory with a model card."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from colearn.errors import ColearnError


def chosen_generation(run_dir: Path, generation: int | None) -> int:
    """Returns the generation to export: the one asked for, else the deployed one, else the newest."""
    if generation is not None:
        return generation
    deployed = run_dir / "deployed.json"
    if deployed.is_file():
        return int(json.loads(deployed.read_text(encoding="utf-8"))["generation"])
    gens = sorted(run_dir.glob("checkpoints/gen_*/offspring"))
    if not gens:
        raise ColearnError(f"{str(run_dir)!r} has no checkpoints/gen_*/offspring; has a generation finished?")
    return int(gens[-1].parent.name.removeprefix("gen_"))


def model_card(node: dict[str, Any] | None, generation: int, run_dir: Path) -> str:
    """Returns the README.md of the exported model: lineage, scores per env, the recipe that made it."""
    lines = ["---", "library_name: transformers", "tags: [colearn]", "---", "",
             f"# colearn offspring, generation {generation}", "", f"Exported from run `{run_dir}`.", ""]
    if node is None:
        return "\n".join(lines + ["No lineage record was found for this generation."])
    lines += ["## Lineage", "", f"- parents: {', '.join(node['parents'])}", f"- ancestor: {node['ancestor']}",
              f"- environment steps so far: {node.get('env_steps')}", "", "## Scores (normalized return; 1.0 = optimal)",
              "", "| env | offspring | " + " | ".join(node["parent_scores"]) + " |",
              "|---|---|" + "---|" * len(node["parent_scores"])]
    for env, score in node["scores"].items():
        parents = " | ".join(f"{ps.get(env, float('nan')):.3f}" for ps in node["parent_scores"].values())
        lines.append(f"| {env} | {score:.3f} | {parents} |")
    lines += ["", "## Recipe", "", "```json", json.dumps(node["recipe"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="colearn export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--generation", type=int, default=None, help="default: the deployed generation")
    args = parser.parse_args(argv)
    gen = chosen_generation(args.run_dir, args.generation)
    source = args.run_dir / "checkpoints" / f"gen_{gen:04d}" / "offspring"
    if not source.is_dir():
        raise ColearnError(f"generation {gen} has no checkpoint at {str(source)!r}; pick another --generation")
    lineage_path = args.run_dir / "lineage.json"
    lineage = json.loads(lineage_path.read_text(encoding="utf-8")) if lineage_path.is_file() else []
    node = next((n for n in lineage if n["generation"] == gen), None)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("optimizer.pt"))
    (tmp / "README.md").write_text(model_card(node, gen, args.run_dir), encoding="utf-8")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"exported generation {gen} to {args.out}")
