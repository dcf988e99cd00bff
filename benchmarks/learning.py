"""Learning benchmark, Q2 and Q3: two specialists against one generalist, and merging alone.

    python benchmarks/learning.py                       # 5 presets x 5 seeds, runs in /tmp/bench_learning
    python benchmarks/learning.py --seeds 3 --presets full pooled
    python benchmarks/learning.py --quick               # a smaller budget (a smoke test, not a measurement)
    python benchmarks/learning.py --aggregate-only DIR  # re-aggregate finished run dirs under DIR

Suite: the default run's (conf/env/two_lakes.yaml): partner A acts on `Lake` (FrozenLake 4x4), B on
`MirrorLake` (the map mirrored, goal bottom-left), at the default budget (4 generations x 4 rounds x 128
episodes per partner). `pooled` is one partner acting on both maps: the same number of env steps in all.
Q1 (two partners sharing one hard task) is benchmarks/solo.py's `pair_*` variants.

Each run is a separate subprocess (this script with --worker, OMP_NUM_THREADS=1), `--jobs` at a time,
in its own run dir `<runs>/<preset>_s<seed>`; a run dir holding `bench.json` is finished and is reused.

Measured per run, from metrics.jsonl (greedy scores are exact: eval.exact):
  * Q2, one model for both maps: env steps (all partners together) at the first eval point where one
    policy (a partner or the offspring) scores >= 0.9 of the optimum greedily on every env, "never" when the
    budget ran out; the final offspring's greedy score per env.
  * Q3, what a merge keeps: per generation and env, the offspring's greedy score over the score of the parent
    that acts on that env ("retention", target >= 0.9); merge gain (`merge/gain`: offspring minus the best
    parent, mean over envs, target >= 0 in >= 80% of generations); the compatibility measured before the merge
    (CKA, cosine, sign conflicts), and how well each separates merges that lost from those that did not.
  * the "system" score of an env (the best greedy score over the policies evaluated at an eval point) and its
    steps to 90%, as before.
Aggregates: mean and 95% Student-t interval over seeds (colearn.report.t_interval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ["full", "independent", "sharing_only", "merging_only", "pooled"]
ENVS = ["Lake", "MirrorLake"]
OWNER = {"Lake": "A", "MirrorLake": "B"}  # the partner that acts on each env
THRESHOLD = 0.9
RETENTION = 0.9
COMPAT = ["cka", "cosine", "sign_conflict"]
# the default run's budget; integration modes only evaluate, so they are left out
BUDGET = [
    "loop.generations=4",
    "loop.rounds=4",
    "rollout.episodes=128",
    "rollout.num_envs=128",
    "eval.greedy=true",
    "eval.sampled=true",
    "integrate.modes=[]",
]
QUICK = [
    "loop.generations=1",
    "loop.rounds=2",
    "rollout.episodes=16",
    "rollout.num_envs=16",
    "eval.episodes=4",
    "eval.greedy=true",
    "eval.sampled=true",
]


# -- one run (a subprocess) -----------------------------------------------------------------------------


def overrides_for(preset: str, seed: int, budget: list[str]) -> list[str]:
    return [f"experiment={preset}", f"seed={seed}", *budget, "progress=false"]


def worker(run_dir: Path, preset: str, seed: int, overrides: list[str]) -> None:
    """Composes the config with Hydra's compose API and runs the loop in `run_dir`."""
    import hydra
    from hydra import compose
    from omegaconf import OmegaConf

    from colearn import loop
    from colearn.cli import experiment as cli

    cli.quiet_libraries()
    cli.register_configs()
    with hydra.initialize_config_dir(config_dir=cli.CONF_DIR, version_base=None):
        dcfg = compose("config", overrides=overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
    cfg = cli.to_config(dcfg)
    cli.validate(cfg)
    start = time.time()
    state = loop.run(cfg, run_dir)
    info = {
        "preset": preset,
        "seed": seed,
        "overrides": overrides,
        "wall_s": round(time.time() - start, 1),
        "env_steps": state.env_steps,
        "stopped_by": state.stopped_by,
    }
    (run_dir / "bench.json").write_text(json.dumps(info, indent=2))


def launch(
    jobs: list[tuple[str, int, Path, list[str]]], parallel: int, stop_when: Callable[[Path], bool] | None = None
) -> float:
    """Runs the jobs as subprocesses, `parallel` at a time; returns the wall time in seconds. A run for which
    `stop_when(run_dir)` holds is sent SIGTERM: the loop stops at its next safe point and the worker still writes
    bench.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running, stopped = list(jobs), [], set()
    start = time.time()
    while pending or running:
        while pending and len(running) < parallel:
            preset, seed, run_dir, ovr = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            out = open(run_dir / "worker.log", "w")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                str(run_dir),
                "--preset",
                preset,
                "--seed",
                str(seed),
                "--",
                *ovr,
            ]
            running.append(
                (
                    subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT),
                    run_dir,
                    out,
                    time.time(),
                )
            )
            print(f"[{time.time() - start:6.0f}s] start {run_dir.name}", flush=True)
        time.sleep(1)
        for item in list(running):
            proc, run_dir, out, t0 = item
            if stop_when is not None and proc.poll() is None and run_dir not in stopped and stop_when(run_dir):
                proc.send_signal(signal.SIGTERM)
                stopped.add(run_dir)
            if proc.poll() is not None:
                out.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode} (see worker.log)"
                print(f"[{time.time() - start:6.0f}s] {status} {run_dir.name} in {time.time() - t0:.0f}s", flush=True)
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


def one_model_steps(events: list[dict[str, Any]]) -> int | None:
    """Returns the env steps at the first eval point where one policy is >= THRESHOLD greedily on every env."""
    scores: dict[tuple[int, str], dict[str, float]] = {}
    for e in events:
        if e.get("event") == "eval" and e["policy"] == "greedy" and e["partner"] != "ancestor":
            scores.setdefault((e["step"], e["partner"]), {})[e["env"]] = e["normalized"]
    done = [step for (step, _), v in scores.items() if all(v.get(env, -math.inf) >= THRESHOLD for env in ENVS)]
    return min(done, default=None)


def merges_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Returns per generation: merge outcome and gain, compatibility before it, and per env the offspring's
    greedy score over its owner's (the parent acting on it) at that generation's end."""
    greedy: dict[tuple[int, str, str], float] = {}  # (generation, partner, env) -> last greedy score
    for e in events:
        if e.get("event") == "eval" and e["policy"] == "greedy":
            greedy[(e["generation"], e["partner"], e["env"])] = e["normalized"]
    out = []
    for m in sorted((e for e in events if e.get("event") == "merge"), key=lambda e: e["generation"]):
        g = m["generation"]
        retention = {}
        for env in ENVS:
            owner, child = greedy.get((g, OWNER[env], env)), greedy.get((g, "offspring", env))
            retention[env] = child / owner if owner and child is not None else None
        out.append(
            {
                "generation": g,
                "method": m.get("method"),
                "outcome": m.get("outcome"),
                "promoted": m.get("promoted"),
                "gain": m.get("merge/gain"),
                "gain_env": {env: m.get(f"merge/gain/{env}") for env in ENVS},
                "retention": retention,
                "compat": {c: m.get(f"merge/compat/{c}") for c in COMPAT},
            }
        )
    return out


def pretraining_steps(run_dir: Path) -> int:
    """Returns the env steps of the run's pretraining (`pretrain.rounds`, in RUN_DIR/pretrain), 0 without one."""
    from colearn.rundir.logger import read_metrics

    pre = run_dir / "pretrain"
    return max((e["step"] for e in read_metrics(pre)), default=0) if (pre / "metrics.jsonl").is_file() else 0


def measure(run_dir: Path) -> dict[str, Any]:
    from colearn.rundir.logger import read_metrics

    info = json.loads((run_dir / "bench.json").read_text())
    events = read_metrics(run_dir)
    greedy, sampled = eval_points(events, "greedy"), eval_points(events, "sampled")
    steps_to = {}
    for env in ENVS:
        steps_to[env] = next((s for s, v in greedy if v.get(env, -math.inf) >= THRESHOLD), None)
    last_gen = max(e["generation"] for e in events if e.get("event") == "eval")
    offspring = {
        f"{e['policy']}/{e['env']}": e["normalized"]
        for e in events
        if e.get("event") == "eval" and e["partner"] == "offspring" and e["generation"] == last_gen
    }
    return {
        **{k: info[k] for k in ("preset", "seed", "wall_s", "env_steps")},
        "pretrain_env_steps": pretraining_steps(run_dir),  # not in env_steps nor in any steps-to column
        "run_dir": str(run_dir),
        "steps_to_90": steps_to,
        "one_model_steps": one_model_steps(events),
        "final_greedy": greedy[-1][1],
        "final_sampled": sampled[-1][1] if sampled else {},
        "final_offspring": offspring,
        "merges": merges_of(events),
        "curve": [{"step": s, **v} for s, v in greedy],
    }


# -- aggregation ----------------------------------------------------------------------------------------


def interval(values: list[float]) -> dict[str, Any]:
    from colearn.analysis.report import t_interval

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean, hw = t_interval(values)
    return {"mean": mean, "ci95": None if math.isnan(hw) else hw, "n": len(values)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for preset in [p for p in PRESETS if any(r["preset"] == p for r in runs)]:
        rs = [r for r in runs if r["preset"] == preset]
        agg: dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "env_steps_budget": max(r["env_steps"] for r in rs),
            "steps_to_90": {},
            "final_greedy": {},
            "final_sampled": {},
            "final_offspring": {},
        }
        reached = [r["one_model_steps"] for r in rs if r["one_model_steps"] is not None]
        agg["one_model_steps"] = {**interval(reached), "reached": len(reached), "runs": len(rs)}
        for env in ENVS:
            hit = [r["steps_to_90"][env] for r in rs if r["steps_to_90"][env] is not None]
            agg["steps_to_90"][env] = {**interval(hit), "reached": len(hit), "runs": len(rs)}
            agg["final_greedy"][env] = interval([r["final_greedy"].get(env) for r in rs])
            agg["final_sampled"][env] = interval([r["final_sampled"].get(env) for r in rs])
            agg["final_offspring"][env] = interval([r["final_offspring"].get(f"greedy/{env}") for r in rs])
        merges = [m for r in rs for m in r["merges"]]
        if any(m["outcome"] != "copy" for m in merges):  # presets with merge=none only copy the best partner
            agg["merges"] = merge_summary(merges)
        out[preset] = agg
    return out


def merge_summary(merges: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns Q3's numbers over every generation of every seed: retention, gain >= 0, and per compatibility
    measure the mean before merges that lost (gain < 0) and before the others."""
    retained = [m["retention"][env] for m in merges for env in ENVS if m["retention"][env] is not None]
    gains = [m["gain"] for m in merges if m["gain"] is not None]
    lost = [m for m in merges if m["gain"] is not None and m["gain"] < 0]
    kept = [m for m in merges if m["gain"] is not None and m["gain"] >= 0]
    predict = {
        c: {
            "before_loss": interval([m["compat"][c] for m in lost if m["compat"][c] is not None]),
            "before_no_loss": interval([m["compat"][c] for m in kept if m["compat"][c] is not None]),
        }
        for c in COMPAT
    }
    return {
        "generations": len(merges),
        "outcomes": {o: sum(m["outcome"] == o for m in merges) for o in sorted({m["outcome"] for m in merges})},
        "retention": interval(retained),
        "retention_ge_target": sum(x >= RETENTION for x in retained),
        "retention_count": len(retained),
        "gain": interval(gains),
        "gain_ge_0": sum(g >= 0 for g in gains),
        "gain_count": len(gains),
        "compat_before": predict,
    }


def fmt(x: dict[str, Any], digits: int = 2, scale: float = 1.0) -> str:
    if x["mean"] is None:
        return "—"
    hw = "" if x["ci95"] is None else f" ± {x['ci95'] / scale:.{digits}f}"
    return f"{x['mean'] / scale:.{digits}f}{hw}"


def steps_cell(s: dict[str, Any]) -> str:
    if s["reached"] == 0:
        return f"never (0/{s['runs']})"
    return f"{fmt(s, 1, 1000)} ({s['reached']}/{s['runs']})"


def goal_check(agg: dict[str, Any]) -> dict[str, Any]:
    """Q2: the offspring of `full` (and of `merging_only`) >= 0.9 on every env at no more env steps than `pooled`
    needs for one model to get there (means over the seeds that reached it; all seeds must reach it).
    Q3: `merging_only`'s offspring keeps >= 90% of each owner's score and its merge gain is >= 0 in >= 80% of
    generations."""
    goal: dict[str, Any] = {}
    pooled = agg.get("pooled", {}).get("one_model_steps")
    for preset in ("full", "merging_only"):
        a = agg.get(preset)
        if not a or not pooled:
            continue
        mine = a["one_model_steps"]
        every = mine["reached"] == mine["runs"]
        goal[f"q2_{preset}"] = {
            "steps": mine["mean"],
            "pooled_steps": pooled["mean"],
            "all_seeds": every,
            "holds": bool(every and pooled["reached"] and mine["mean"] <= pooled["mean"]),
        }
    m = agg.get("merging_only", {}).get("merges")
    if m:
        goal["q3"] = {
            "retention_share": m["retention_ge_target"] / max(m["retention_count"], 1),
            "gain_ge_0_share": m["gain_ge_0"] / max(m["gain_count"], 1),
            "holds": m["retention_ge_target"] == m["retention_count"] and m["gain_ge_0"] >= 0.8 * m["gain_count"],
        }
    return goal


def table(agg: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = [
        "One model ≥ 0.9 on both maps: thousands of env steps (all partners) at the first eval point where one "
        "policy (a partner or the offspring) scores ≥ 0.9 of the optimum greedily on every env; mean ± 95% "
        "t-interval over the seeds that reached it (reached/runs). Per-env steps: the best policy per env. "
        "Final offspring: the last generation's offspring, greedy.",
        "",
        "| preset | budget (k steps) | one model, both maps | "
        + " | ".join(f"{e} steps→90%" for e in ENVS)
        + " | "
        + " | ".join(f"{e} final offspring" for e in ENVS)
        + " |",
        "|" + "---|" * (3 + 2 * len(ENVS)),
    ]
    for preset, a in agg.items():
        cells = [preset, f"{a['env_steps_budget'] / 1000:.1f}", steps_cell(a["one_model_steps"])]
        cells += [steps_cell(a["steps_to_90"][env]) for env in ENVS]
        cells += [fmt(a["final_offspring"][env]) for env in ENVS]
        lines.append("| " + " | ".join(cells) + " |")
    merged = {p: a["merges"] for p, a in agg.items() if "merges" in a}
    if merged:
        lines += [
            "",
            "Merges (every generation of every seed): retention = offspring / the parent acting on the env "
            "(greedy); gain = offspring − best parent (mean over envs); compatibility before merges that lost "
            "(gain < 0) and before the others.",
            "",
            "| preset | generations | outcomes | retention mean | retention ≥ 0.9 | gain mean | gain ≥ 0 | "
            + " | ".join(f"{c} before loss / no loss" for c in COMPAT)
            + " |",
            "|" + "---|" * (7 + len(COMPAT)),
        ]
        for preset, m in merged.items():
            outcomes = ", ".join(f"{k} {v}" for k, v in m["outcomes"].items())
            cells = [
                preset,
                str(m["generations"]),
                outcomes,
                fmt(m["retention"]),
                f"{m['retention_ge_target']}/{m['retention_count']}",
                fmt(m["gain"], 3),
                f"{m['gain_ge_0']}/{m['gain_count']}",
            ]
            cells += [
                f"{fmt(m['compat_before'][c]['before_loss'])} / {fmt(m['compat_before'][c]['before_no_loss'])}"
                for c in COMPAT
            ]
            lines.append("| " + " | ".join(cells) + " |")
    per_run = ["", "Per-run merge gain by generation (outcome):", ""]
    for r in runs:
        if r["merges"] and r["preset"] in merged:
            per_run.append(
                f"- {r['preset']} s{r['seed']}: "
                + ", ".join(f"{m['gain']:+.3f} ({m['outcome']})" for m in r["merges"] if m["gain"] is not None)
            )
    return "\n".join(lines + per_run)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from colearn.analysis.report import t_quantile

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
    pretraining = sorted({r["pretrain_env_steps"] for r in runs})
    if pretraining != [0]:
        text += f"\n\nPretraining (pretrain.rounds), before each run and in none of its steps: {pretraining} env steps."
    goal = goal_check(agg)
    print(text)
    print("\nGoal check:", json.dumps(goal, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if wall_s is None and out.is_file() else {}
    aggregated_by = command
    if previous.get("runs_dir") == str(runs_dir):  # re-aggregating: keep how the runs were made and how long
        command, wall_s = previous.get("command", command), previous.get("wall_s_total")
        budget = previous.get("budget_overrides", budget)
    result = {
        "command": command,
        "aggregated_by": aggregated_by,
        "runs_dir": str(runs_dir),
        "budget_overrides": budget,
        "wall_s_total": wall_s,
        "wall_s_runs": sum(r["wall_s"] for r in runs),
        "system_score": "best greedy normalized return over the policies evaluated at each eval point "
        "(partners after each round, plus the offspring at a generation's end)",
        "threshold": THRESHOLD,
        "envs": ENVS,
        "aggregate": agg,
        "goal": goal,
        "table": text,
        "runs": runs,
    }
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
    jobs = [
        (p, s, args.runs_dir / f"{p}_s{s}", overrides_for(p, s, budget))
        for s in range(args.seeds)
        for p in args.presets
    ]
    todo = [j for j in jobs if not (j[2] / "bench.json").is_file()]
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already finished), {args.jobs} at a time, in {args.runs_dir}")
    wall = launch(todo, args.jobs)
    print(f"wall time {wall:.0f}s")
    report(args.runs_dir, args.out, command, round(wall, 1), budget)


if __name__ == "__main__":
    main()
