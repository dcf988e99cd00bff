"""Throughput benchmark: env steps per second of a whole run, and where each second goes, by phase.

    python benchmarks/throughput.py                          # the default config (`colearn`), seed 0, 1 thread
    python benchmarks/throughput.py --repeats 3              # median of 3 runs
    python benchmarks/throughput.py -- env=bench_suite ...   # any overrides after `--`

Each run is `colearn` in a subprocess (threads=1, the config's default), alone on the machine: run nothing
else beside it. The loop logs a "timing" event (wall seconds per phase since the previous one) at every
round and generation end; this script sums them over the run:

  act       acting (the partners' rollouts)          learn            the learning updates
  store     writing and reading experience shards   eval             evaluation of partners and offspring
  dynamics  co-evolution metrics (each round)        integrate        integration modes (generation end)
  breed     compatibility, merge, gate               save_generation  the generation's directory
  checkpoint round and generation checkpoints
  start, sync  backend=ray's actors starting, and weights moving between them and the loop (benchmarks/backend.py)

"loop" is the sum of the phases; "start-up" the rest of the wall time (imports, model and env set-up, the
report). Steps/s is env steps (acting only; evaluation episodes are not counted) over the whole wall time.
Writes benchmarks/results/throughput.json with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
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


def one_run(overrides: list[str]) -> dict[str, Any]:
    """Returns one run's wall seconds, env steps and seconds per phase."""
    with tempfile.TemporaryDirectory(prefix="colearn_throughput_") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "colearn.cli", f"hydra.run.dir={run_dir}", "progress=false", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    phases: dict[str, float] = defaultdict(float)
    for e in events:
        if e["event"] == "timing":
            for k, v in e.items():
                if k.startswith("time/"):
                    phases[k.removeprefix("time/")] += v
    steps = max(e["step"] for e in events)
    return {"wall_s": wall, "env_steps": steps, "steps_per_s": steps / wall, "phases_s": dict(phases)}


def table(runs: list[dict[str, Any]]) -> str:
    """Returns the median run's phases as a Markdown table."""
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    loop = sum(median["phases_s"].values())
    rows = sorted(median["phases_s"].items(), key=lambda kv: -kv[1])
    rows += [("loop (sum)", loop), ("start-up and report", median["wall_s"] - loop), ("wall", median["wall_s"])]
    lines = ["| phase | seconds | share of wall |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.1f} | {s / median['wall_s']:.0%} |" for name, s in rows]
    walls = [r["wall_s"] for r in runs]
    lines.append(
        f"\n{median['env_steps']:,} env steps; {median['steps_per_s']:.0f} steps/s end to end "
        f"(wall min/median/max {min(walls):.1f}/{statistics.median(walls):.1f}/{max(walls):.1f} s, "
        f"{len(runs)} run(s))"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("overrides", nargs="*", help="colearn overrides (after --)")
    args = parser.parse_args()
    runs = [one_run(args.overrides) for _ in range(args.repeats)]
    text = table(runs)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/throughput.py " + shlex.join(sys.argv[1:]),
        "overrides": args.overrides,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "table": text,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
