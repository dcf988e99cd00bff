"""Soak: many generations of a tiny run; resident memory and run-directory size per generation.

Each generation is run by `colearn.loop.run` continuing from the run's own checkpoint (so the soak also
exercises resume). Memory and disk must stay flat apart from the experience data and the logs, which grow
by design (every step record and every event is kept).

    python benchmarks/soak.py                 # 30 generations
    python benchmarks/soak.py --generations 8 # shorter
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from colearn import loop
from colearn.cli.console import quiet_libraries
from colearn.config import Config, EnvConfig, EnvSpec, EvalConfig, LoopConfig, ModelConfig, PartnerSpec, RolloutConfig

RESULTS = Path(__file__).parent / "results" / "soak.json"


def rss_mb() -> float:
    """Returns this process's resident set size in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.exists() else 0.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Returns the least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def soak_config(generations: int) -> Config:
    lake = "colearn/FrozenLake-v0"
    suite = [EnvSpec(lake, "Lake"), EnvSpec(lake, "MirrorLake", {"desc": ["FFFS", "HFHF", "HFFF", "GFFH"]})]
    return Config(
        model=ModelConfig(),
        progress=False,
        env=EnvConfig(suite=suite, partners=[PartnerSpec("A", ["Lake"]), PartnerSpec("B", ["MirrorLake"])]),
        loop=LoopConfig(generations=generations, rounds=2, keep_generations=2),
        rollout=RolloutConfig(episodes=32, group_size=8, num_envs=32),
        eval=EvalConfig(episodes=2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generations", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()
    run_dir = Path(tempfile.mkdtemp(prefix="colearn-soak-"))
    rows = []
    start = time.time()
    for g in range(1, args.generations + 1):
        loop.run(soak_config(g), run_dir)
        rows.append(
            {
                "generation": g,
                "rss_mb": rss_mb(),
                "run_dir_mb": size_mb(run_dir),
                "experience_mb": size_mb(run_dir / "experience"),
                "checkpoints_mb": size_mb(run_dir / "checkpoints"),
                "logs_mb": size_mb(run_dir / "metrics.jsonl") + size_mb(run_dir / "tb"),
                "seconds": round(time.time() - start, 1),
            }
        )
        r = rows[-1]
        print(
            f"gen {g:3d}  rss {r['rss_mb']:7.1f} MiB  run dir {r['run_dir_mb']:7.2f} MiB  "
            f"(experience {r['experience_mb']:6.2f}, checkpoints {r['checkpoints_mb']:5.2f}, logs {r['logs_mb']:5.2f})",
            flush=True,
        )
    other = [r["run_dir_mb"] - r["experience_mb"] - r["logs_mb"] for r in rows]
    half = rows[len(rows) // 2 :]
    summary = {
        # least-squares slope over the second half: a leak shows as a steady climb, not as one noisy sample
        "rss_slope_mb_per_generation": slope([r["generation"] for r in half], [r["rss_mb"] for r in half]),
        "rss_mb_first": rows[0]["rss_mb"],
        "rss_mb_last": rows[-1]["rss_mb"],
        "rss_mb_max": max(r["rss_mb"] for r in rows),
        "non_experience_non_log_mb_gen2": other[min(1, len(other) - 1)],
        "non_experience_non_log_mb_last": other[-1],
        "experience_mb_per_generation": (rows[-1]["experience_mb"] - rows[0]["experience_mb"]) / max(len(rows) - 1, 1),
        "logs_mb_per_generation": (rows[-1]["logs_mb"] - rows[0]["logs_mb"]) / max(len(rows) - 1, 1),
    }
    print(
        "\n| generations | RSS first / max / last (MiB) | RSS slope, 2nd half (MiB/gen) | run dir minus experience "
        "and logs, gen 2 -> last (MiB) | experience per gen (MiB) | logs per gen (MiB) |\n|---|---|---|---|---|---|"
    )
    print(
        f"| {len(rows)} | {summary['rss_mb_first']:.0f} / {summary['rss_mb_max']:.0f} / {summary['rss_mb_last']:.0f} | "
        f"{summary['rss_slope_mb_per_generation']:+.2f} | {summary['non_experience_non_log_mb_gen2']:.2f} -> "
        f"{other[-1]:.2f} | {summary['experience_mb_per_generation']:.3f} | {summary['logs_mb_per_generation']:.3f} |"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"command": " ".join(["python", *sys.argv]), "summary": summary, "rows": rows}, indent=1)
    )
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
