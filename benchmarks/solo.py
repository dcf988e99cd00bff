"""The learner alone, and two partners on one task: one env, several seeds, variants of the learner or preset.

    python benchmarks/solo.py                                   # every env, the default learner, 5 seeds
    python benchmarks/solo.py --envs SlipperyLake --variants default old_learner --seeds 3   # an ablation
    python benchmarks/solo.py --envs SlipperyLake --variants pair_independent pair_sharing_only pair_full  # Q1
    python benchmarks/solo.py --aggregate-only                  # re-aggregate the finished runs
    python benchmarks/solo.py ... --stop-at-target              # stop each run at 90% (steps to 90% only)
    python benchmarks/solo.py ... -- learn.target_kl=0          # overrides for every run (give a new --runs-dir)

A learner variant runs one partner alone on a one-env suite (`merge=none`, no exchange, no integration modes); a
`pair_<preset>` variant runs two partners, A and B, both acting on the env, as `experiment=<preset>` (Q1: does
sharing experience on one task make each partner learn faster?). Each run is a subprocess
with one torch thread, `--jobs` at a time (benchmarks/learning.py's runner), in `<runs>/<env>_<variant>_s<seed>`.
The budget per env is a number of rounds sized so that the issue's target (env steps to 90% of the optimal
greedy return) fits with room; eval is exact (dynamic programming over the env's table) after every round.
Measured per run: env steps per partner at the first eval point where a greedy policy (a partner's, or the
offspring's) scores >= 0.9 of the optimum ("never" when the budget ran out), the best greedy score, and the
final greedy and sampled scores (the best over the policies evaluated there).
Writes benchmarks/results/solo.json (with the command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from learning import RESULTS, launch

THRESHOLD = 0.9
# env name -> (gymnasium id and kwargs, target env steps to 90%, rounds in the budget, overrides for the env)
ENVS: dict[str, tuple[str, int, int, list[str]]] = {
    "Lake": ("colearn/FrozenLake-v0", 5_000, 12, []),
    "SlipperyLake": ("colearn/FrozenLakeSlippery-v0", 50_000, 60, []),
    "Lake8x8": ("colearn/FrozenLake8x8-v0", 30_000, 40, []),
    # a random policy's episodes run to the 200-step limit: fewer episodes a round, more rounds in the budget
    "Taxi": ("colearn/Taxi-v0", 200_000, 80, ["rollout.episodes=32"]),
    # one step an episode; not tabular in generate mode: scored on eval.episodes problems
    "Addition1": (
        "colearn/Addition-v0,kwargs:{digits:1}",
        20_000,
        40,
        ["rollout.episodes=512", "rollout.mode=generate", "eval.episodes=200"],
    ),
    "Addition2": (
        "colearn/Addition-v0,kwargs:{digits:2}",
        100_000,
        80,
        ["rollout.episodes=1024", "rollout.mode=generate", "eval.episodes=200"],
    ),
}
# learner variants: overrides on top of the default config (the ablation: each undoes one kept change)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "advantage_norm_none": ["learn.advantage_norm=none"],
    "advantage_norm_mean_std": ["learn.advantage_norm=mean_std"],
    "epochs_4": ["learn.epochs=4"],
    "minibatch_128": ["learn.batch_size=128"],
    "self_imitation": ["learn.distill_from=self"],  # also imitate its own successes
    "norm_none_entropy_0.02": ["learn.advantage_norm=none", "learn.entropy_coef=0.02"],
    "target_kl_0.05": ["learn.target_kl=0.05"],  # PPO's early stop of a round's updates
    "deterministic": ["learn=deterministic"],  # no KL stop, a floor of 0.1 under the advantages' std
    "episodes_512": ["rollout.episodes=512", "loop.rounds=20"],  # 4x the data a round, at about the same budget
    "epochs_10": ["learn.epochs=10"],
    "entropy_0.02": ["learn.entropy_coef=0.02"],
    "lr_2e-4": ["learn.lr=2e-4"],
    "lambda_0.8": ["learn.gae_lambda=0.8"],  # advantages lean more on the value head: less variance
    "entropy_0.005": ["learn.entropy_coef=0.005"],  # the entropy bonus before it became 0.02
    "entropy_0.05": ["learn.entropy_coef=0.05"],
    "entropy_0.02_lr_1e-3": ["learn.entropy_coef=0.02", "learn.lr=1e-3"],
    "entropy_0.02_episodes_64": ["learn.entropy_coef=0.02", "rollout.episodes=64", "loop.rounds=120"],
    "no_position_line": [],  # the env's observation without its last line (ENV_KWARGS)
    "old_learner": [
        "learn.advantage=return_to_go",
        "learn.epochs=4",
        "learn.batch_size=128",
        "learn.lr=2e-3",
        "learn.entropy_coef=0.02",
        "rollout.gamma=0.95",
    ],
}
ENV_KWARGS = {"no_position_line": "position_line:false"}  # variants that change the env, not the learner
PAIRS = {f"pair_{p}": p for p in ("independent", "sharing_only", "full")}  # two partners on the env, as this preset
VARIANTS.update({name: [] for name in PAIRS})
PAIR_GENERATIONS = 3  # a pair's rounds are split into generations: the merges of `full` happen at their ends


def overrides_for(env: str, variant: str, seed: int) -> list[str]:
    env_id, _, rounds, env_overrides = ENVS[env]
    kwargs = f",kwargs:{{{ENV_KWARGS[variant]}}}" if variant in ENV_KWARGS else ""
    common = [
        f"env.suite=[{{id:{env_id},name:{env}{kwargs}}}]",
        "integrate.modes=[]",
        "eval.greedy=true",
        "eval.sampled=true",
        f"seed={seed}",
        "progress=false",
        *env_overrides,
    ]
    if variant in PAIRS:  # each partner plays every round: as many rounds, as many steps per partner as alone
        pair = f"env.partners=[{{name:A,envs:[{env}]}},{{name:B,envs:[{env}]}}]"
        return [
            *common,
            f"experiment={PAIRS[variant]}",
            pair,
            f"loop.generations={PAIR_GENERATIONS}",
            f"loop.rounds={-(-rounds // PAIR_GENERATIONS)}",
        ]
    return [
        *common,
        f"env.partners=[{{name:A,envs:[{env}]}}]",
        "merge=none",
        "loop.exchange=false",
        "loop.generations=1",
        f"loop.rounds={rounds}",
        *VARIANTS[variant],
    ]


def measure(run_dir: Path) -> dict[str, Any]:
    """Returns one run's steps to 90% (None: never), best and final greedy, final sampled."""
    from colearn.rundir.logger import read_metrics

    info = json.loads((run_dir / "bench.json").read_text())
    env, variant = info["preset"].split("/")
    partners = 2 if variant in PAIRS else 1
    points: dict[int, dict[str, float]] = {}
    for e in read_metrics(run_dir):
        if e.get("event") == "eval" and e["partner"] != "ancestor":
            best = points.setdefault(e["step"] // partners, {})
            best[e["policy"]] = max(best.get(e["policy"], 0.0), e["normalized"])
    curve = sorted(points.items())
    return {
        "env": env,
        "variant": variant,
        "seed": info["seed"],
        "wall_s": info["wall_s"],
        "env_steps": info["env_steps"],
        "partners": partners,
        "steps_to_90": next((s for s, v in curve if v["greedy"] >= THRESHOLD), None),
        "best_greedy": max(v["greedy"] for _, v in curve),
        "final_greedy": curve[-1][1]["greedy"],
        "final_sampled": curve[-1][1].get("sampled"),
        "curve": [{"step": s, **v} for s, v in curve],
    }


def reached_target(run_dir: Path) -> bool:
    """Returns whether a greedy policy of the run (a partner's or the offspring's) has scored >= THRESHOLD."""
    from colearn.rundir.logger import read_metrics  # skips the torn last line of a run still writing

    if not (run_dir / "metrics.jsonl").is_file():
        return False
    return any(
        e.get("event") == "eval"
        and e["policy"] == "greedy"
        and e["partner"] != "ancestor"
        and e["normalized"] >= THRESHOLD
        for e in read_metrics(run_dir)
    )


def table(runs: list[dict[str, Any]]) -> str:
    """Returns one Markdown row per (env, variant): median steps to 90% (never counted as infinite), and the mean
    with its 95% Student-t interval over the seeds that reached it."""
    from colearn.analysis.report import t_interval

    lines = [
        "| env | variant | target (k steps) | reached | median steps per partner to 90% (k) | mean ± 95% t (k), "
        "seeds that reached | per seed (k) | best greedy (median) | final greedy / sampled (median) |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for env in ENVS:
        for variant in VARIANTS:
            rs = sorted((r for r in runs if r["env"] == env and r["variant"] == variant), key=lambda r: r["seed"])
            if not rs:
                continue
            steps = [r["steps_to_90"] for r in rs]
            median = statistics.median(s if s is not None else float("inf") for s in steps)
            med = "never" if median == float("inf") else f"{median / 1000:.1f}"
            seeds = ", ".join("never" if s is None else f"{s / 1000:.1f}" for s in steps)
            reached = [s / 1000 for s in steps if s is not None]
            mean, half = t_interval(reached) if reached else (math.nan, math.nan)
            interval = "-" if not reached else f"{mean:.1f} ± {half:.1f}" if len(reached) > 1 else f"{mean:.1f}"
            fg = statistics.median(r["final_greedy"] for r in rs)
            fs = statistics.median(r["final_sampled"] for r in rs)
            lines.append(
                f"| {env} | {variant} | {ENVS[env][1] / 1000:.0f} | {sum(s is not None for s in steps)}/"
                f"{len(rs)} | {med} | {interval} | {seeds} | {statistics.median(r['best_greedy'] for r in rs):.2f} | "
                f"{fg:.2f} / {fs:.2f} |"
            )
    return "\n".join(lines)


def ratios(runs: list[dict[str, Any]], resamples: int = 10_000) -> list[str]:
    """Returns, per env with `pair_independent` runs, one line per other pair variant: its mean steps per partner to
    90% over `pair_independent`'s, with a 95% percentile bootstrap interval (seeds resampled within each variant,
    a run that never reached 90% counted at its budget's steps). Q1's target is <= 0.6."""
    import numpy as np

    def steps(env: str, variant: str) -> np.ndarray:
        rs = [r for r in runs if r["env"] == env and r["variant"] == variant]
        return np.array([r["steps_to_90"] or r["env_steps"] / r["partners"] for r in rs], dtype=float)

    rng, lines = np.random.default_rng(0), []
    for env in ENVS:
        base = steps(env, "pair_independent")
        for variant in ("pair_sharing_only", "pair_full"):
            other = steps(env, variant)
            if len(base) < 2 or len(other) < 2:
                continue
            boot = [rng.choice(other, len(other)).mean() / rng.choice(base, len(base)).mean() for _ in range(resamples)]
            low, high = np.percentile(boot, [2.5, 97.5])
            lines.append(
                f"{env}: {variant} / pair_independent, mean steps per partner to 90%: "
                f"{other.mean() / base.mean():.2f} (95% bootstrap {low:.2f}-{high:.2f}; "
                f"{len(other)} and {len(base)} seeds)"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench_solo"))
    ap.add_argument("--out", type=Path, default=RESULTS / "solo.json")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, after `--`")
    ap.add_argument(
        "--stop-at-target",
        action="store_true",
        help="stop each run once a greedy policy scores >= 0.9 (steps to 90%% only; final scores are at the stop)",
    )
    args = ap.parse_args()
    command = "python benchmarks/solo.py " + shlex.join(sys.argv[1:])
    jobs = [
        (f"{e}/{v}", s, args.runs_dir / f"{e}_{v}_s{s}", [*overrides_for(e, v, s), *args.overrides])
        for e in args.envs
        for v in args.variants
        for s in range(args.seeds)
    ]
    wall = None
    if not args.aggregate_only:
        todo = [j for j in jobs if not (j[2] / "bench.json").is_file()]
        print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already finished), {args.jobs} at a time")
        wall = round(launch(todo, args.jobs, reached_target if args.stop_at_target else None), 1)
    runs = [measure(d) for _, _, d, _ in jobs if (d / "bench.json").is_file()]
    text = "\n".join([table(runs), "", *ratios(runs)])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": command,
                "wall_s_total": wall,
                "threshold": THRESHOLD,
                "stopped_at_target": args.stop_at_target,
                "overrides": args.overrides,
                "budgets": {e: ENVS[e] for e in args.envs},
                "variants": VARIANTS,
                "table": text,
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
