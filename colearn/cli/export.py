"""`colearn export RUN_DIR [--generation N] OUT`: a deployable Hugging Face directory with a model card.

The card says the prompt format, how to act with the model in Python, and its scores. A LoRA offspring is its
adapter beside `base/` (the frozen base model), and its adapter_config.json names OUT/base by absolute path, so
`AutoPeftModelForCausalLM.from_pretrained(OUT)` loads it offline. An offspring that is a mixture
(merge.fallback=mixture, see `colearn.breeding.mixture`) is exported as that mixture directory: mixture.json and one
Hugging Face directory per member, with a card giving the routing table."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym

from colearn.breeding.mixture import UNMAPPED, read_manifest
from colearn.cli.console import quiet_libraries
from colearn.cli.resume import run_config
from colearn.config import Config
from colearn.errors import ColearnError
from colearn.experience.rollout import acting_mode  # importing it registers the colearn/... env ids
from colearn.models.directories import is_mixture
from colearn.models.partner import ADAPTER_CONFIG, BASE_DIR, point_adapter_at_base
from colearn.rundir.logger import read_metrics


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
    raise ColearnError(
        f"{str(run_dir)!r} has no deployed.json (no offspring passed the promotion gate); pick one "
        f"with --generation N (saved: {', '.join(map(str, gens))})"
    )


def check_output(out: Path) -> None:
    """Raises ColearnError when `out` exists and is not an empty directory: export never overwrites files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ColearnError(f"OUT {str(out)!r} already exists and is not an empty directory; choose a new one")


def lineage_lines(node: dict[str, Any] | None) -> list[str]:
    """Returns the card's lineage, scores per env against the parents and recipe sections (markdown lines)."""
    if node is None:
        return ["No lineage record was found for this generation."]
    lines = [
        "## Lineage",
        "",
        f"- parents: {', '.join(node['parents'])}",
        f"- ancestor: {node['ancestor']}",
        f"- environment steps so far: {node.get('env_steps')}",
        "",
        "## Against its parents (normalized return; 1.0 = optimal)",
        "",
        "| env | offspring | " + " | ".join(node["parent_scores"]) + " |",
        "|---|---|" + "---|" * len(node["parent_scores"]),
    ]
    for env, score in node["scores"].items():
        parents = " | ".join(f"{ps.get(env, float('nan')):.3f}" for ps in node["parent_scores"].values())
        lines.append(f"| {env} | {score:.3f} | {parents} |")
    return lines + ["", "## Recipe", "", "```json", json.dumps(node["recipe"], indent=2, default=str), "```"]


def offspring_scores(run_dir: Path, generation: int) -> list[dict[str, Any]]:
    """Returns the offspring's evaluation at `generation`: its "eval" events in metrics.jsonl, the last one per
    (env, policy), in the order first logged."""
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    latest = {
        (e["env"], e["policy"]): e
        for e in read_metrics(run_dir)
        if e.get("event") == "eval" and e.get("partner") == "offspring" and e.get("generation") == generation
    }
    return list(latest.values())


def scores_lines(scores: list[dict[str, Any]]) -> list[str]:
    """Returns the card's section on the model's own scores: return, success, optimum per env and policy."""
    if not scores:
        return ["## Scores", "", "The run's metrics.jsonl has no evaluation of this offspring.", ""]
    lines = [
        "## Scores",
        "",
        "| env | policy | mean return | success | optimum | normalized | episodes |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        optimum = "unknown" if s.get("optimal") is None else f"{s['optimal']:.3f}"
        episodes = "exact" if s.get("exact") else s.get("episodes", "?")
        lines.append(
            f"| {s['env']} | {s['policy']} | {s['mean_return']:.3f} | {s['success']:.3f} | {optimum} | "
            f"{s['normalized']:.3f} | {episodes} |"
        )
    return lines + [
        "",
        "greedy takes the most probable action, sampled draws it from the policy; normalized is the "
        "mean return over the optimum (value iteration over the env's transition table); episodes "
        '"exact" is the expected value computed over that table, no sampling.',
        "",
    ]


def prompt_lines(cfg: Config) -> list[str]:
    """Returns the card's prompt format section: the template, an example prompt and each env's actions."""
    suite = cfg.env.suite
    first = gym.make(suite[0].id, **suite[0].kwargs)
    example = cfg.model.prompt_template.format(obs=first.reset(seed=cfg.eval.seed)[0])
    first.close()
    lines = [
        "## Prompt format",
        "",
        f"A prompt is the env's text observation in the template "
        f"`{cfg.model.prompt_template!r}` (a Python format string with `obs`); the action continues it as "
        f"`{cfg.model.action_prefix!r}` followed by the action's text. A prompt in {suite[0].name}:",
        "",
        "```",
        example,
        "```",
        "",
        "| env | gymnasium id | kwargs | actions |",
        "|---|---|---|---|",
    ]
    for spec in suite:
        legal = acting_mode(spec, cfg.rollout.mode)
        actions = ", ".join(legal) if legal else f"free text (generated, at most {cfg.rollout.max_new_tokens} tokens)"
        lines.append(f"| {spec.name} | {spec.id} | {json.dumps(spec.kwargs) if spec.kwargs else ''} | {actions} |")
    return lines + [
        "",
        "With action names the policy scores each one as a continuation of the prompt and takes the "
        "most probable (greedy) or samples one at the run's temperature "
        f"({cfg.rollout.temperature}).",
        "",
    ]


def acting_lines(cfg: Config, out: Path, lora: bool) -> list[str]:
    """Returns the card's section on loading the model and acting with it in the run's first env."""
    where, spec = str(out.resolve()), cfg.env.suite[0]
    model_cfg = (
        f"ModelConfig(prompt_template={cfg.model.prompt_template!r}, action_prefix={cfg.model.action_prefix!r}"
        f", dtype={cfg.model.dtype!r})"
    )
    legal = acting_mode(spec, cfg.rollout.mode)
    make_args = "".join(f", {k}={v!r}" for k, v in spec.kwargs.items())
    code = [
        "import gymnasium as gym",
        "import torch",
        "",
        "import envs  # colearn's text envs: registers colearn/...",
        "from colearn.config import ModelConfig",
        "from colearn.models.partner import Partner",
        "",
        f"policy = Partner.load({where!r}, 'offspring', {model_cfg})",
        f"env = gym.make({spec.id!r}{make_args})",
        f"legal = {legal!r}  # None: the model writes its action as free text",
        "observation, _ = env.reset(seed=0)",
        "done = False",
        "while not done:",
        "    action = policy.act([observation], legal, greedy=True, generator=torch.Generator(),",
        f"                        max_new_tokens={cfg.rollout.max_new_tokens}).texts[0]",
        "    observation, reward, terminated, truncated, _ = env.step(action)",
        "    done = terminated or truncated",
    ]
    loader = "peft's AutoPeftModelForCausalLM" if lora else "transformers' AutoModelForCausalLM"
    lines = [
        "## Acting",
        "",
        "```python",
        *code,
        "```",
        "",
        f"Without colearn's acting code, {loader}.from_pretrained({where!r}) loads the model and "
        "AutoTokenizer.from_pretrained the tokenizer; build prompts as above.",
    ]
    if lora:
        lines += [
            "",
            f"This is a LoRA adapter on the frozen base model in `{BASE_DIR}/`; adapter_config.json names "
            f"`{where}/{BASE_DIR}` by absolute path. Once this directory has moved to DIR, peft's call needs "
            "the base named: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR + "
            f'"/{BASE_DIR}"), DIR)`; `Partner.load(DIR, ...)` finds `{BASE_DIR}/` by itself.',
        ]
    return lines + [""]


def model_card(
    node: dict[str, Any] | None,
    generation: int,
    run_dir: Path,
    cfg: Config | None,
    scores: list[dict[str, Any]],
    out: Path,
    lora: bool,
) -> str:
    """Returns the README.md of the exported model: prompt format, how to act, its scores, then lineage, scores
    against its parents and the recipe that made it. Without the run's config (`cfg` None) the prompt and acting
    sections say so."""
    library = "peft" if lora else "transformers"
    tags = "[colearn, lora]" if lora else "[colearn]"
    lines = [
        "---",
        f"library_name: {library}",
        f"tags: {tags}",
        "---",
        "",
        f"# colearn offspring, generation {generation}",
        "",
        f"Exported from run `{run_dir}`.",
        "",
    ]
    if cfg is None:
        lines += ["The run has no .hydra/config.yaml, so its prompt format is unknown here.", ""]
    else:
        lines += prompt_lines(cfg) + acting_lines(cfg, out, lora)
    return "\n".join(lines + scores_lines(scores) + lineage_lines(node)) + "\n"


def mixture_card(
    node: dict[str, Any] | None,
    generation: int,
    run_dir: Path,
    manifest: dict[str, Any],
    out: Path,
    scores: list[dict[str, Any]],
) -> str:
    """Returns the README.md of an exported mixture: what it is, its routing table (env -> member), how to
    load it, its scores, then lineage and recipe as for one model."""
    recipe = (node or {}).get("recipe", {})
    fallback = f"merge.fallback={recipe.get('fallback', 'mixture')}"
    why = f"{fallback}: {recipe['reason']}" if recipe.get("reason") else fallback
    lines = [
        "---",
        "library_name: transformers",
        "tags: [colearn, mixture]",
        "---",
        "",
        f"# colearn offspring, generation {generation}: a mixture of {', '.join(manifest['members'])}",
        "",
        f"Exported from run `{run_dir}`.",
        "",
        f"This offspring is not one model. The partners were not averaged ({why}); they are kept side by "
        "side and each env is routed to the member best on it. `mixture.json` holds the routing table; each "
        "member is a Hugging Face directory under `members/<name>/`.",
        "",
        *cluster_lines(recipe.get("clusters", [])),
    ]
    lines += routing_lines(manifest) + loading_lines(manifest, out, run_dir) + scores_lines(scores)
    return "\n".join(lines + lineage_lines(node)) + "\n"


def cluster_lines(clusters: list[dict[str, Any]]) -> list[str]:
    """Returns the card's account of merge.fallback=cluster: which members are merges of which partners."""
    merged = [c for c in clusters if c["outcome"] == "merged"]
    if not clusters:
        return []
    lines = [
        f"- `{c['name']}`: the merge ({c['merge'].get('method', '?')}) of {', '.join(c['members'])}" for c in merged
    ]
    alone = [n for c in clusters if c["outcome"] != "merged" for n in c["members"]]
    lines += [f"- {', '.join(alone)}: partners kept as they were"] if alone else []
    return [
        "The partners were grouped by compatibility (every pair of a group compatible) and each group merged:",
        "",
        *lines,
        "",
    ]


def routing_lines(manifest: dict[str, Any]) -> list[str]:
    """Returns the card's routing section: one row per env and what decides elsewhere."""
    rows = [f"| {env} | {member} |" for env, member in manifest["env_map"].items()]
    elsewhere = f"In an env not in this table, {UNMAPPED}."
    return ["## Routing", "", "| env | member |", "|---|---|", *rows, "", elsewhere, ""]


def loading_lines(manifest: dict[str, Any], out: Path, run_dir: Path) -> list[str]:
    """Returns the card's section on loading the mixture (colearn.breeding.mixture.load_mixture) or one member alone."""
    env = next(iter(manifest["env_map"]), "ENV")
    code = [
        "from pathlib import Path",
        "",
        "import torch",
        "from colearn.breeding.mixture import load_mixture",
        "from colearn.cli.resume import run_config",
        "",
        f'policy = load_mixture({str(out)!r}, run_config(Path({str(run_dir)!r})).model, "cpu")',
        f"act = policy.in_env({env!r}).act  # the env's name picks the member that decides",
        "actions = act(observations, legal_actions, greedy=True, generator=torch.Generator())",
    ]
    member = f"{out}/members/{manifest['members'][0]}"
    return [
        "## Loading",
        "",
        "```python",
        *code,
        "```",
        "",
        "`load_mixture` needs the run's model config (`run_config`), or a `colearn.config.ModelConfig` with the "
        "same prompt_template, action_prefix and dtype. One member alone loads with "
        f'`AutoModelForCausalLM.from_pretrained("{member}")`.',
        "",
    ]


def copy_with_card(source: Path, out: Path, card: str) -> None:
    """Copies the checkpoint at `source` to `out` (absent or an empty directory) without optimizer state, with
    `card` as README.md, written aside (in a fresh hidden directory beside `out`) and renamed into place. Each
    LoRA directory in it (the model, or a mixture's members) gets its adapter config pointed at its own base/
    under `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / "export"
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("optimizer.pt"))  # at every depth
        for config in tmp.rglob(ADAPTER_CONFIG):
            if (config.parent / BASE_DIR).is_dir():
                point_adapter_at_base(config.parent, out / config.parent.relative_to(tmp))
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
    parser.add_argument(
        "--generation",
        type=int,
        default=None,
        help="default: the deployed generation (deployed.json); needed when there is none",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    check_output(args.out)
    gen = chosen_generation(args.run_dir, args.generation)
    source = args.run_dir / "checkpoints" / f"gen_{gen:04d}" / "offspring"
    if not source.is_dir():
        raise ColearnError(f"generation {gen} has no checkpoint at {str(source)!r}; pick another --generation")
    lineage_path = args.run_dir / "lineage.json"
    lineage = json.loads(lineage_path.read_text(encoding="utf-8")) if lineage_path.is_file() else []
    node = next((n for n in lineage if n["generation"] == gen), None)
    scores = offspring_scores(args.run_dir, gen)
    if is_mixture(source):
        manifest = read_manifest(source)
        copy_with_card(source, args.out, mixture_card(node, gen, args.run_dir, manifest, args.out, scores))
        routes = ", ".join(f"{env} -> {member}" for env, member in manifest["env_map"].items())
        print(
            f"exported generation {gen} to {args.out}: a mixture of {', '.join(manifest['members'])} "
            f"routed by env ({routes}); load it with colearn.breeding.mixture.load_mixture"
        )
        return
    cfg = run_config(args.run_dir) if (args.run_dir / ".hydra" / "config.yaml").is_file() else None
    lora = (source / ADAPTER_CONFIG).is_file()
    copy_with_card(source, args.out, model_card(node, gen, args.run_dir, cfg, scores, args.out, lora))
    how = "AutoPeftModelForCausalLM" if lora else "AutoModelForCausalLM"
    print(f"exported generation {gen} to {args.out}; load it with {how}.from_pretrained (README.md says how to act)")
