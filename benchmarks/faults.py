"""Faults: a short run killed at random moments, damaged, and resumed twice at once; does it end as if untouched?

Each case runs the `colearn` command as a user would, then compares the run directory with an uninterrupted
run of the same config: every metrics event (wall-clock times aside), every experience row and the last
offspring's weights. Cases:

    kill N      SIGKILL at a seeded random moment of the run, then `colearn resume` (with --restart when it
                says no checkpoint is intact: killed before the first one)
    damaged     killed in generation 1, every round checkpoint's weights torn, then resumed (from gen_0000)
    concurrent  killed, then two `colearn resume` started at once: one must refuse, the other finish

    python benchmarks/faults.py              # 5 kills
    python benchmarks/faults.py --kills 20 --seed 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TINY = [
    "loop.generations=2",
    "loop.rounds=2",
    "rollout.episodes=16",
    "rollout.group_size=4",
    "rollout.num_envs=16",
    "eval.episodes=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "progress=false",
]
CLI = [sys.executable, "-m", "colearn.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, f"hydra.run.dir={run_dir}", *TINY], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "resume", str(run_dir), *extra], env=ENV, capture_output=True, text=True)


def resume_to_end(run_dir: Path) -> str:
    """Resumes the run to its end; returns how (the checkpoint it continued from, or that it restarted)."""
    done = resume(run_dir)
    if done.returncode and "--restart" in done.stderr:  # killed before its first checkpoint
        done = resume(run_dir, "--restart")
        how = "restarted"
    else:
        how = next(
            (
                line.split("continuing from ")[1].split(" (")[0]
                for line in done.stdout.splitlines()
                if "continuing from" in line
            ),
            "?",
        )
    if done.returncode:
        raise RuntimeError(f"colearn resume {run_dir} failed: {done.stderr.strip()}")
    return how


def kill_after(run_dir: Path, seconds: float, first: str = "metrics.jsonl") -> None:
    """Starts the run and SIGKILLs it `seconds` after the file `first` appears in it (or lets it end first)."""
    proc = start(run_dir)
    while not (run_dir / first).exists() and proc.poll() is None:
        time.sleep(0.02)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def events(run_dir: Path) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        json.dumps({k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}, sort_keys=True)
        for r in rows
    ]


def rows(run_dir: Path) -> list[tuple[str, int]]:
    from colearn.experience.store import ExperienceStore

    return [(r["episode_id"], r["step"]) for r in ExperienceStore(run_dir / "experience").table().to_pylist()]


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(d / "checkpoints" / "gen_0001" / "offspring" / "model.safetensors") for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def compare(run_dir: Path, straight: Path) -> dict[str, Any]:
    """What differs from the uninterrupted run (metrics, experience, weights; empty when bit-identical), and the
    experience rows lost or doubled."""
    got, want = collections.Counter(rows(run_dir)), collections.Counter(rows(straight))
    differs = [
        name
        for name, same in (
            ("metrics", events(run_dir) == events(straight)),
            ("experience", rows(run_dir) == rows(straight)),
            ("weights", same_weights(run_dir, straight)),
        )
        if not same
    ]
    return {
        "differs": differs,
        "lost": sum((want - got).values()),
        "doubled": sum(n - 1 for n in got.values() if n > 1),
    }


def tear_round_checkpoints(run_dir: Path) -> None:
    for weights in run_dir.glob("checkpoints/round_*/partners/*/model.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-10:] = bytes(10)
        weights.write_bytes(bytes(data))


def kill_case(run_dir: Path, seconds: float) -> str:
    kill_after(run_dir, seconds)
    return resume_to_end(run_dir)


def damaged_case(run_dir: Path) -> str:
    proc = start(run_dir)
    while not (run_dir / "checkpoints" / "gen_0000" / "resume.json").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tear_round_checkpoints(run_dir)
    return resume_to_end(run_dir)


def concurrent_case(run_dir: Path, seconds: float) -> str:
    kill_after(run_dir, seconds, "checkpoints/round_g0000_r001")  # resumable: both resumes would go on
    procs = [
        subprocess.Popen(
            [*CLI, "resume", str(run_dir)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outcomes = [p.communicate() for p in procs]
    codes = sorted(p.returncode for p in procs)
    refused = [err.strip() for p, (_, err) in zip(procs, outcomes) if p.returncode]
    if codes != [0, 2] or "in use by process" not in refused[0]:
        raise RuntimeError(f"two resumes at once ended {codes}: {refused}")
    return "one refused: " + refused[0].split("; ")[0].removeprefix("colearn: error: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run directories (to look into a failure)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="colearn-faults-"))
    try:
        straight = root / "straight" / "run"
        subprocess.run([*CLI, f"hydra.run.dir={straight}", *TINY], env=ENV, check=True, capture_output=True)
        times = [json.loads(line)["time"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
        length = times[-1] - times[0]  # from the first event to the last: kills land anywhere in between
        cases = [
            (f"kill {i} at {t:.1f} s", lambda d, t=t: kill_case(d, t))
            for i, t in enumerate(rng.uniform(0.0, length) for _ in range(args.kills))
        ]
        cases += [
            ("damaged round checkpoints", damaged_case),
            ("concurrent resumes", lambda d: concurrent_case(d, rng.uniform(0.0, length))),
        ]
        identical = 0
        for i, (name, case) in enumerate(cases):
            run_dir = root / f"case{i}" / "run"  # same directory name: same run_id in the step records
            how = case(run_dir)
            result = compare(run_dir, straight)
            identical += not result["differs"]
            outcome = f"DIFFERS: {', '.join(result['differs'])}" if result["differs"] else "identical"
            print(
                f"{name:28s} {outcome:30s} lost {result['lost']:4d}  doubled {result['doubled']:4d}  ({how})",
                flush=True,
            )
        print(f"{identical}/{len(cases)} ended bit-identical to the uninterrupted run")
    finally:
        if args.keep:
            print(f"run directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
