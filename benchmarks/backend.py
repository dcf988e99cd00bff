"""Backend benchmark: wall seconds per generation of the local backend against backend=ray (one actor per partner,
one torch thread each), with 2 and 4 partners, and where each generation's seconds go, by phase.

    python benchmarks/backend.py                      # the default run's settings, 2 generations, 2 and 4 partners
    python benchmarks/backend.py --repeats 3          # median of 3 runs of each
    python benchmarks/backend.py --quick              # a tiny setting: checks that the script runs (< 5 minutes)
    python benchmarks/backend.py -- rollout.episodes=256   # any overrides after `--`, for every run

Each run is `colearn` in a subprocess (threads=1), alone on the machine: run nothing else beside it. With 4
partners, partners C and D act where A and B do (Lake and MirrorLake). The loop logs a "timing" event (wall seconds
per phase) at every round and generation end; a generation's wall time is the sum of its phases, without the run's
start. The phases:

  start      the backend's start: Ray's actors started and each partner loaded into its own (0 for local)
  act        the partners' rollouts (with Ray: all partners at once, and their step records back to the loop)
  learn      the learning updates (with Ray: at once, each lesson's step records sent to its actor)
  eval       evaluation of the partners (with Ray: in their actors, at once) and of the offspring (in the loop)
  sync       Ray: the trained weights and optimizer state back into the loop's copies each round, and the
             offspring's copies into the actors after a merge (0 for local)
  store      writing and reading experience shards   dynamics   co-evolution metrics (each round)
  checkpoint round and generation checkpoints        breed      compatibility, merge, gate
  integrate  integration modes                       save_generation  the generation's directory

"start-up" is the process's wall time outside the loop's phases: imports, model and env set-up, and for Ray
`ray.init` starting a local Ray. Writes benchmarks/results/backend.json (or --out) with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# partners C and D act where A and B do: twice the work of the default pair
FOUR_PARTNERS = (
    "env.partners=[{name:A,envs:[Lake]},{name:B,envs:[MirrorLake]},{name:C,envs:[Lake]},{name:D,envs:[MirrorLake]}]"
)
QUICK = [
    "loop.rounds=2",
    "rollout.episodes=16",
    "rollout.group_size=4",
    "rollout.num_envs=16",
    "eval.episodes=2",
    "learn.epochs=4",
    "integrate.modes=[]",
]
PHASES = ["start", "act", "learn", "eval", "sync", "store", "dynamics", "checkpoint", "breed", "other"]


def one_run(backend: str, partners: int, overrides: list[str]) -> dict[str, Any]:
    """Returns one run's wall seconds, its start-up, and the seconds per phase of each generation."""
    with tempfile.TemporaryDirectory(prefix="colearn_backend_") as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "colearn.cli",
            f"hydra.run.dir={run_dir}",
            "progress=false",
            "threads=1",
            f"backend={backend}",
            *([FOUR_PARTNERS] if partners == 4 else []),
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    per_generation: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e["event"] != "timing":
            continue
        # a timing event holds the seconds since the previous one; a generation's last is logged at round 0 of the next
        generation = e["generation"] - (e["round"] == 0)
        for k, v in e.items():
            if k.startswith("time/"):
                phase = k.removeprefix("time/")
                per_generation[generation][phase if phase in PHASES else "other"] += v
    phases = {g: dict(p) for g, p in sorted(per_generation.items())}
    startup = phases[0].pop("start", 0.0)
    looped = sum(sum(p.values()) for p in phases.values()) + startup
    return {
        "wall_s": wall,
        "start_s": startup,
        "startup_s": wall - looped,
        "generation_s": [sum(p.values()) for p in phases.values()],
        "phases_s": {phase: sum(p.get(phase, 0.0) for p in phases.values()) / len(phases) for phase in PHASES[1:]},
        "env_steps": max(e["step"] for e in events),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the run with the median mean generation time, and every run's mean generation time."""
    ordered = sorted(runs, key=lambda r: statistics.mean(r["generation_s"]))
    chosen = dict(ordered[len(ordered) // 2])
    chosen["generation_s_all"] = [round(statistics.mean(r["generation_s"]), 2) for r in runs]
    return chosen


def table(results: dict[str, dict[str, Any]], partner_counts: list[int]) -> str:
    """Returns the markdown table: one row per backend and partner count, seconds per generation and per phase."""
    head = "| partners | backend | s / generation | vs local | start s | start-up s | " + " | ".join(PHASES[1:])
    lines = [head + " |", "|---:|---|---:|---:|---:|---:|" + "---:|" * len(PHASES[1:])]
    for n in partner_counts:
        local = statistics.mean(results[f"local_{n}"]["generation_s"])
        for backend in ("local", "ray"):
            r = results[f"{backend}_{n}"]
            per_gen = statistics.mean(r["generation_s"])
            phases = " | ".join(f"{r['phases_s'][p]:.2f}" for p in PHASES[1:])
            lines.append(
                f"| {n} | {backend} | {per_gen:.2f} | {local / per_gen:.2f}x | {r['start_s']:.1f} | "
                f"{r['startup_s']:.1f} | {phases} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partners", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a tiny setting, to check the script runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "backend.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --, for every run")
    args = ap.parse_args()
    overrides = [f"loop.generations={args.generations}", *(QUICK if args.quick else []), *args.overrides]
    results = {}
    for n in args.partners:
        for backend in ("local", "ray"):
            runs = [one_run(backend, n, overrides) for _ in range(args.repeats)]
            results[f"{backend}_{n}"] = median_run(runs)
            print(f"{backend} with {n} partners: {results[f'{backend}_{n}']['generation_s_all']} s per generation")
    text = table(results, args.partners)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/backend.py " + shlex.join(sys.argv[1:]),
                "overrides": overrides,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
                "results": results,
                "table": text,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
