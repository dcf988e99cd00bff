"""Does the default run work every time? `colearn` with no arguments but the seed, seeds 0-9.

    python benchmarks/default_run.py                 # seeds 0-9, two runs at a time, in /tmp/bench_default
    python benchmarks/default_run.py --seeds 3 --jobs 1
    python benchmarks/default_run.py --runs-dir /tmp/bench_none --out /tmp/none.json -- learn.advantage_norm=none

Each run is the default config (`seed=N`, one torch thread), a subprocess via benchmarks/learning.py's runner.
What a run ends with is its deployed offspring (`deployed.json`, what `colearn export` writes: the best offspring of
the run); the last generation's offspring is reported beside it.
Target: the deployed offspring scores >= 0.9 of the optimum greedily on both maps in >= 9 of 10 seeds, each run in
<= 3 minutes alone (with two runs at a time on two cores, a run's wall time is close to what it takes alone;
benchmarks/throughput.py times one run with nothing beside it). Writes results/default_run.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from learning import RESULTS, launch

THRESHOLD = 0.9


def offspring_scores(run_dir: Path) -> dict[str, float]:
    """Returns the last generation's offspring greedy score per env."""
    from colearn.rundir.logger import read_metrics

    events = [
        e
        for e in read_metrics(run_dir)
        if e.get("event") == "eval" and e["partner"] == "offspring" and e["policy"] == "greedy"
    ]
    last = max(e["generation"] for e in events)
    return {e["env"]: e["normalized"] for e in events if e["generation"] == last}


def deployed(run_dir: Path) -> tuple[int, dict[str, float]]:
    """Returns the deployed offspring's generation and normalized greedy score per env (deployed.json)."""
    info = json.loads((run_dir / "deployed.json").read_text())
    return info["generation"], info["scores"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead of 0..--seeds-1")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench_default"))
    ap.add_argument("--out", type=Path, default=RESULTS / "default_run.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --: a variant of the default run")
    args = ap.parse_args()
    jobs = [
        ("default", s, args.runs_dir / f"s{s}", [f"seed={s}", "progress=false", *args.overrides])
        for s in (args.seed_list or range(args.seeds))
    ]
    wall = launch([j for j in jobs if not (j[2] / "bench.json").is_file()], args.jobs)
    runs = []
    for _, seed, run_dir, _ in jobs:
        info = json.loads((run_dir / "bench.json").read_text())
        scores = offspring_scores(run_dir)
        generation, kept = deployed(run_dir)
        runs.append(
            {
                "seed": seed,
                "wall_s": info["wall_s"],
                "env_steps": info["env_steps"],
                "offspring": scores,
                "deployed_generation": generation,
                "deployed": kept,
                "solved": min(kept.values()) >= THRESHOLD,
                "last_solved": min(scores.values()) >= THRESHOLD,
            }
        )
    lines = [
        "| seed | deployed offspring greedy (generation) | solved both | last offspring greedy | wall s | env steps |",
        "|---:|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['seed']} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["deployed"].items())
        + f" ({r['deployed_generation']}) | {'yes' if r['solved'] else 'no'} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["offspring"].items())
        + f" | {r['wall_s']:.0f} | {r['env_steps']:,} |"
        for r in runs
    ]
    solved = sum(r["solved"] for r in runs)
    last = sum(r["last_solved"] for r in runs)
    lines.append(
        f"\nthe deployed offspring solved both maps in {solved} of {len(runs)} seeds (the last generation's in {last});"
        f" wall max {max(r['wall_s'] for r in runs):.0f} s"
    )
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/default_run.py " + shlex.join(sys.argv[1:]),
                "wall_s_total": round(wall, 1),
                "solved": solved,
                "runs": runs,
                "table": text,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
