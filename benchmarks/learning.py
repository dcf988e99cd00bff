"""Learning benchmark: every experiment preset on one env suite, several seeds, the same env-step budget.

    python benchmarks/learning.py                       # 6 presets x 3 seeds, runs in /tmp/bench_learning
    python benchmarks/learning.py --seeds 5             # more seeds
    python benchmarks/learning.py --quick               # a smaller budget (a smoke test, not a measurement)
    python benchmarks/learning.py --aggregate-only DIR  # re-aggregate finished run dirs under DIR

Suite (conf/env/bench_suite.yaml): deterministic FrozenLake 4x4 (Lake), slippery FrozenLake 4x4
(SlipperyLake) and one-digit addition (Addition1, generate mode: it has no action names). Partner A
acts in Lake and Addition1, partner B in SlipperyLake; the `pooled` preset is one partner acting in all
three (conf/experiment/pooled_bench.yaml), so every preset plays each env rollout.episodes times per
round: the same environment-step budget.

Each run is a separate subprocess (this script with --worker, OMP_NUM_THREADS=1), `--jobs` at a time,
in its own run dir `<runs>/<preset>_s<seed>`; a run dir holding `bench.json` is finished and is reused.

Measured per run, from metrics.jsonl:
  * the "system" score of an env at an eval point = the best greedy normalized return over every policy
    evaluated at that point (the partners after the round; at a generation's end also its offspring);
    steps to 90% = env steps (`step` of the eval event) at the first eval point where it is >= 0.9,
    "never" when the budget ran out first;
  * final normalized return per env, greedy and sampled: the system score at the last eval point
    (also the final offspring's own score, in the JSON);
  * merge gain per generation: `merge/gain` (offspring minus best parent, mean over envs, greedy) and
    `merge/gain/<env>`. Presets with merge=none "breed" by copying the best partner (gain ~ 0 by design).
Aggregates: mean and 95% Student-t interval over seeds (colearn.report.t_interval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ["full", "independent", "sharing_only", "merging_only", "self_imitation", "pooled"]
EXPERIMENT = {"pooled": "pooled_bench"}  # pooled.yaml hardcodes the two_lakes env names
ENVS = ["Lake", "SlipperyLake", "Addition1"]
THRESHOLD = 0.9
# sized so that 6 presets x 3 seeds take ~30 min, 2 runs at a time on a 2-core CPU
BUDGET = ["loop.generations=3", "loop.rounds=4", "rollout.episodes=128", "rollout.num_envs=128",
          "eval.episodes=16", "eval.greedy=true", "eval.sampled=true"]
QUICK = ["loop.generations=1", "loop.rounds=2", "rollout.episodes=16", "rollout.num_envs=16",
         "eval.episodes=4", "eval.greedy=true", "eval.sampled=true"]


# -- one run (a subprocess) -----------------------------------------------------------------------------

def overrides_for(preset: str, seed: int, budget: list[str]) -> list[str]:
    return ["env=bench_suite", f"experiment={EXPERIMENT.get(preset, preset)}", f"seed={seed}", *budget,
            "progress=false"]


def worker(run_dir: Path, preset: str, seed: int, overrides: list[str]) -> None:
    """Composes the config with Hydra's compose API and runs the loop in `run_dir`."""
    import hydra
    from hydra import compose
    from omegaconf import OmegaConf

    from colearn import cli, loop
    from colearn.config import register_configs

    cli.quiet_libraries()
    register_configs()
    with hydra.initialize_config_dir(config_dir=cli.CONF_DIR, version_base=None):
        dcfg = compose("config", overrides=overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
    cfg = cli.to_config(dcfg)
    cli.validate(cfg)
    start = time.time()
    state = loop.run(cfg, run_dir)
    info = {"preset": preset, "seed": seed, "overrides": overrides, "wall_s": round(time.time() - start, 1),
            "env_steps": state.env_steps, "stopped_by": state.stopped_by}
    (run_dir / "bench.json").write_text(json.dumps(info, indent=2))


def launch(jobs: list[tuple[str, int, Path, list[str]]], parallel: int) -> float:
    """Runs the jobs as subprocesses, `parallel` at a time; returns the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running = list(jobs), []
    start = time.time()
    while pending or running:
        while pending and len(running) < parallel:
            preset, seed, run_dir, ovr = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            out = open(run_dir / "worker.log", "w")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir), "--preset", preset,
                   "--seed", str(seed), "--", *ovr]
            running.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT),
                            run_dir, out, time.time()))
            print(f"[{time.time() - start:6.0f}s] start {run_dir.name}", flush=True)
        time.sleep(1)
        for item in list(running):
            proc, run_dir, out, t0 = item
            if proc.poll() is not None:
                out.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode} (see worker.log)"
                print(f"[{time.time() - start:6.0f}s] {status} {run_dir.name} in {time.time() - t0:.0f}s",
                      flush=True)
    return time.time() - start


# -- measurements of one run ----------------------------------------------------------------------------

def eval_points(events: list[dict[str, Any]], policy: str) -> list[tuple[int, dict[str, float]]]:
    """Returns [(env steps, {env: best normalized return over the policies evaluated at that point})]."""
    points: dict[int, dict[str, float]] = {}
    for e in events:
        if e.get("event") == "eval" and e["policy"] == policy:
            best = points.setdefault(e["step"], {})
            best[e["env"]] = max(best.get(e["env"], -math.inf), e["normalized"])
    return sorted(points.items())


def measure(run_dir: Path) -> dict[str, Any]:
    from colearn.logger import read_metrics

    info = json.loads((run_dir / "bench.json").read_text())
    events = read_metrics(run_dir)
    greedy, sampled = eval_points(events, "greedy"), eval_points(events, "sampled")
    steps_to = {}
    for env in ENVS:
        steps_to[env] = next((s for s, v in greedy if v.get(env, -math.inf) >= THRESHOLD), None)
    last_gen = max(e["generation"] for e in events if e.get("event") == "eval")
    offspring = {f"{e['policy']}/{e['env']}": e["normalized"] for e in events
                 if e.get("event") == "eval" and e["partner"] == "offspring" and e["generation"] == last_gen}
    merges = sorted((e for e in events if e.get("event") == "merge"), key=lambda e: e["generation"])
    return {
        **{k: info[k] for k in ("preset", "seed", "wall_s", "env_steps")},
        "run_dir": str(run_dir),
        "steps_to_90": steps_to,
        "final_greedy": greedy[-1][1],
        "final_sampled": sampled[-1][1] if sampled else {},
        "final_offspring": offspring,
        "merge_gain": [e.get("merge/gain") for e in merges],
        "merge_gain_env": [{env: e.get(f"merge/gain/{env}") for env in ENVS} for e in merges],
        "merge_outcome": [{"method": e.get("method"), "outcome": e.get("outcome"), "promoted": e.get("promoted")}
                          for e in merges],
        "curve": [{"step": s, **v} for s, v in greedy],
    }


# -- aggregation ----------------------------------------------------------------------------------------

def interval(values: list[float]) -> dict[str, Any]:
    from colearn.report import t_interval

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean, hw = t_interval(values)
    return {"mean": mean, "ci95": None if math.isnan(hw) else hw, "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for preset in [p for p in PRESETS if any(r["preset"] == p for r in runs)]:
        rs = [r for r in runs if r["preset"] == preset]
        budget = max(r["env_steps"] for r in rs)
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "env_steps_budget": budget,
                               "steps_to_90": {}, "steps_to_90_censored": {}, "final_greedy": {},
                               "final_sampled": {}, "merge_gain": [], "merge_gain_env": []}
        for env in ENVS:
            reached = [r["steps_to_90"][env] for r in rs if r["steps_to_90"][env] is not None]
            agg["steps_to_90"][env] = {**interval(reached), "reached": len(reached), "runs": len(rs)}
            # "never" counted as the run's whole budget: a lower bound on the true mean
            agg["steps_to_90_censored"][env] = interval(
                [r["steps_to_90"][env] if r["steps_to_90"][env] is not None else r["env_steps"] for r in rs])
            agg["final_greedy"][env] = interval([r["final_greedy"].get(env) for r in rs])
            agg["final_sampled"][env] = interval([r["final_sampled"].get(env) for r in rs])
        for g in range(max(len(r["merge_gain"]) for r in rs)):
            agg["merge_gain"].append(interval([r["merge_gain"][g] for r in rs if g < len(r["merge_gain"])]))
            agg["merge_gain_env"].append({env: interval([r["merge_gain_env"][g][env] for r in rs
                                                         if g < len(r["merge_gain_env"])]) for env in ENVS})
        out[preset] = agg
    return out


def fmt(x: dict[str, Any], digits: int = 2, scale: float = 1.0) -> str:
    if x["mean"] is None:
        return "—"
    hw = "" if x["ci95"] is None else f" ± {x['ci95'] / scale:.{digits}f}"
    return f"{x['mean'] / scale:.{digits}f}{hw}"


def goal_check(agg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Goal: full needs <= half the env steps of the best baseline (per env, censored means: "never"
    counts as the budget, so a baseline that never reaches 90% is credited with its whole budget, a
    lower bound), and merges never lose to the best parent by more than noise (the 95% interval of the
    mean gain reaches 0 in every generation; the worst single merge's per-env loss is reported next to the
    evaluation's binomial noise, sd of one env's normalized score ~ 0.5 / sqrt(eval.episodes) / optimal)."""
    if "full" not in agg:
        return {}
    steps = {}
    for env in ENVS:
        full = agg["full"]["steps_to_90_censored"][env]["mean"]
        base = {p: a["steps_to_90_censored"][env]["mean"] for p, a in agg.items() if p != "full"}
        best = min(base, key=base.get) if base else None
        steps[env] = {"full": full, "full_reached": agg["full"]["steps_to_90"][env]["reached"],
                      "best_baseline": best, "best_baseline_steps": base.get(best),
                      "best_baseline_reached": agg[best]["steps_to_90"][env]["reached"] if best else None,
                      "ratio": full / base[best] if best and base[best] else None,
                      "holds": bool(best and agg["full"]["steps_to_90"][env]["reached"]
                                    and full <= 0.5 * base[best])}
    gains = agg["full"]["merge_gain"]
    merge_ok = all(g["mean"] is not None and g["mean"] + (g["ci95"] or 0) >= 0 for g in gains)
    worst = {p: min((g for r in runs if r["preset"] == p for gen in r["merge_gain_env"] for g in gen.values()
                     if g is not None), default=None) for p in ("full", "merging_only")}
    return {"steps": steps, "merge_gain_ci_reaches_0": merge_ok, "worst_single_merge_gain_per_env": worst}


def table(agg: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    gens = max(len(a["merge_gain"]) for a in agg.values())
    lines = ["Steps to 90% of optimal: best greedy normalized return over partners and offspring at each eval "
             "point; thousands of env steps, mean ± 95% t-interval over the runs that reached it (reached/runs). "
             "Final: same system score at the last eval point. Merge gain: offspring − best parent (greedy, "
             "mean over envs); merge=none presets copy the best partner.",
             "", "| preset | budget (k steps) | " + " | ".join(f"{e} steps→90%" for e in ENVS) + " | "
             + " | ".join(f"{e} final greedy / sampled" for e in ENVS) + " | "
             + " | ".join(f"merge gain gen{g}" for g in range(gens)) + " |",
             "|" + "---|" * (2 + 2 * len(ENVS) + gens)]
    for preset, a in agg.items():
        cells = [preset, f"{a['env_steps_budget'] / 1000:.1f}"]
        for env in ENVS:
            s = a["steps_to_90"][env]
            cells.append("never (0/%d)" % s["runs"] if s["reached"] == 0
                         else f"{fmt(s, 1, 1000)} ({s['reached']}/{s['runs']})")
        for env in ENVS:
            cells.append(f"{fmt(a['final_greedy'][env])} / {fmt(a['final_sampled'][env])}")
        for g in range(gens):
            cells.append(fmt(a["merge_gain"][g], 3) if g < len(a["merge_gain"]) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    per_run = ["", "Per-run merge gain (offspring − best parent, mean over envs, greedy) by generation:", ""]
    for r in runs:
        outcome = ",".join(f"{o['method']}:{o['outcome']}" for o in r["merge_outcome"])
        per_run.append(f"- {r['preset']} s{r['seed']}: " + ", ".join(f"{g:+.3f}" for g in r["merge_gain"])
                       + f" ({outcome})")
    return "\n".join(lines + per_run)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from colearn.report import t_quantile

    fig, axes = plt.subplots(1, len(ENVS), figsize=(5 * len(ENVS), 4), sharey=True)
    for ax, env in zip(axes, ENVS):
        for preset in PRESETS:
            rs = [r for r in runs if r["preset"] == preset]
            if not rs:
                continue
            n_points = min(len(r["curve"]) for r in rs)  # eval points line up across seeds; steps differ a little
            steps = np.array([[r["curve"][i]["step"] for i in range(n_points)] for r in rs], float).mean(0)
            vals = np.array([[r["curve"][i].get(env, np.nan) for i in range(n_points)] for r in rs], float)
            mean = vals.mean(0)
            ax.plot(steps, mean, marker="o", ms=3, label=preset)
            if len(rs) > 1:
                hw = t_quantile(len(rs) - 1) * vals.std(0, ddof=1) / math.sqrt(len(rs))
                ax.fill_between(steps, mean - hw, mean + hw, alpha=0.15)
        ax.axhline(THRESHOLD, color="grey", ls="--", lw=0.8)
        ax.set_ylim(-0.1, 1.3)  # t-bands of 3 seeds of 0/1 outcomes reach far past [0, 1]
        ax.set_title(env)
        ax.set_xlabel("environment steps")
    axes[0].set_ylabel("best greedy normalized return\n(partners / offspring)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("mean over seeds, band = 95% t-interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect_runs(runs_dir: Path) -> list[dict[str, Any]]:
    runs = [measure(d) for d in sorted(runs_dir.iterdir()) if (d / "bench.json").is_file()]
    return sorted(runs, key=lambda r: (PRESETS.index(r["preset"]), r["seed"]))


def report(runs_dir: Path, out: Path, command: str, wall_s: float | None, budget: list[str]) -> None:
    runs = collect_runs(runs_dir)
    if not runs:
        sys.exit(f"no finished runs (bench.json) under {runs_dir}")
    agg = aggregate(runs)
    text = table(agg, runs)
    goal = goal_check(agg, runs)
    print(text)
    print("\nGoal check:", json.dumps(goal, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if wall_s is None and out.is_file() else {}
    aggregated_by = command
    if previous.get("runs_dir") == str(runs_dir):  # re-aggregating: keep how the runs were made and how long
        command, wall_s = previous.get("command", command), previous.get("wall_s_total")
        budget = previous.get("budget_overrides", budget)
    result = {"command": command, "aggregated_by": aggregated_by, "runs_dir": str(runs_dir), "budget_overrides": budget,
              "wall_s_total": wall_s, "wall_s_runs": sum(r["wall_s"] for r in runs),
              "system_score": "best greedy normalized return over the policies evaluated at each eval point "
                              "(partners after each round, plus the offspring at a generation's end)",
              "threshold": THRESHOLD, "envs": ENVS, "aggregate": agg, "goal": goal, "table": text, "runs": runs}
    out.write_text(json.dumps(result, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    ap.add_argument("--quick", action="store_true", help="a much smaller budget (smoke test)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench_learning"))
    ap.add_argument("--out", type=Path, default=RESULTS / "learning.json", help="JSON path; the PNG goes next to it")
    ap.add_argument("--aggregate-only", type=Path, metavar="DIR", help="only aggregate the finished runs under DIR")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides after --, e.g. -- loop.rounds=2")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.seed, args.overrides)
        return
    command = "python benchmarks/learning.py " + shlex.join(sys.argv[1:])
    budget = (QUICK if args.quick else BUDGET) + args.overrides
    if args.aggregate_only:
        report(args.aggregate_only, args.out, command, None, budget)
        return
    jobs = [(p, s, args.runs_dir / f"{p}_s{s}", overrides_for(p, s, budget))
            for s in range(args.seeds) for p in args.presets]
    todo = [j for j in jobs if not (j[2] / "bench.json").is_file()]
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already finished), {args.jobs} at a time, in {args.runs_dir}")
    wall = launch(todo, args.jobs)
    print(f"wall time {wall:.0f}s")
    report(args.runs_dir, args.out, command, round(wall, 1), budget)


if __name__ == "__main__":
    main()
