"""Benchmark of `colearn merge`: time and peak memory of every operator against the I/O ceiling.

    python benchmarks/merge.py            # a 134M-parameter Llama (hidden 768, 12 layers, vocab 32000), ~5-10 min
    python benchmarks/merge.py --quick    # a ~10M-parameter Llama, ~1 min

Three checkpoints (ancestor and two perturbed partners, float32, one safetensors file each)
are written to a temp dir; each operator runs as a `colearn merge` subprocess whose wall time
and peak RSS (os.wait4's ru_maxrss of that one child) are measured.  The I/O ceiling is a
subprocess that imports the same modules, reads every input tensor by tensor and writes a
checkpoint of the same size; the startup baseline only imports them.  Inputs sit in the page
cache (they were just written), so the ceiling is a warm-cache one.

Targets: wall time within 1.5x the ceiling for the deterministic operators; peak RSS above
the startup baseline below 2 x the largest tensor + the model being written (the merge
accumulates its output in memory before writing it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "merge.json"
FULL = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2048, "vocab_size": 32000,
        "num_attention_heads": 12}
QUICK = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 704, "vocab_size": 8000,
         "num_attention_heads": 4}
# operator -> recipe; density 0.5 as in conf/merge/*.yaml
RECIPES = {
    "linear": {"method": "linear"},
    "task_arithmetic": {"method": "task_arithmetic", "weights": [0.5, 0.5]},
    "slerp": {"method": "slerp"},
    "model_stock": {"method": "model_stock"},
    "ties": {"method": "ties", "density": 0.5},
    "magnitude_prune": {"method": "magnitude_prune", "density": 0.5},
    "breadcrumbs": {"method": "breadcrumbs", "density": 0.9, "params": {"gamma": 0.01}},
    "dare_linear": {"method": "dare_linear", "density": 0.5},
    "dare_ties": {"method": "dare_ties", "density": 0.5},
    "della": {"method": "della", "density": 0.5, "params": {"epsilon": 0.1}},
}
RANDOM = {"dare_linear", "dare_ties", "della"}
MB = 2**20

# The imports `colearn merge` pays for (colearn.cli.main quiets transformers and datasets first).
_STARTUP = "import colearn.cli as c; c.quiet_libraries(); import colearn.merge, colearn.merge_cli\n"
_CEILING = _STARTUP + textwrap.dedent("""
    import sys
    from safetensors import safe_open
    from safetensors.torch import save_file
    base, partners, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    with safe_open(base, "pt") as b:
        handles = [safe_open(p, "pt") for p in partners]
        written = {}
        for key in b.keys():
            tensors = [h.get_tensor(key) for h in handles]
            written[key] = b.get_tensor(key).clone()
        save_file(written, out, metadata=b.metadata())
""")


def build_checkpoints(workdir: Path, shape: dict[str, int]) -> dict[str, object]:
    """Writes ancestor/, a/, b/ (a and b = ancestor + N(0, 0.01) noise) and returns the model's sizes."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "ancestor", max_shard_size="100GB")
    del model
    state = load_file(workdir / "ancestor" / "model.safetensors")
    for seed, name in enumerate(("a", "b"), start=1):
        generator = torch.Generator().manual_seed(seed)
        (workdir / name).mkdir()
        shutil.copy(workdir / "ancestor" / "config.json", workdir / name / "config.json")
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        save_file(noisy, workdir / name / "model.safetensors", metadata={"format": "pt"})
        del noisy
    largest = max(v.numel() * v.element_size() for v in state.values())
    total = sum(v.numel() * v.element_size() for v in state.values())
    return {"config": shape, "parameters": params, "model_mb": total / MB, "largest_tensor_mb": largest / MB}


def measured(argv: list[str]) -> dict[str, float]:
    """Runs a subprocess and returns its wall time (s) and peak RSS (MB, this child only); raises if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    out, err = child.communicate()
    if child.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed ({child.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss is in KB on Linux


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def merge_command(workdir: Path, method: str) -> list[str]:
    import yaml

    recipe = workdir / f"{method}.yaml"
    recipe.write_text(yaml.safe_dump(RECIPES[method]), encoding="utf-8")
    out = workdir / f"out_{method}"
    return [sys.executable, "-m", "colearn.cli", "merge", "--base", str(workdir / "ancestor"), "--recipe",
            str(recipe), "--out", str(out), str(workdir / "a"), str(workdir / "b")]


def best_of(runs: int, argv: list[str], cleanup: Path | None = None) -> dict[str, float]:
    """Returns the run with the least wall time of `runs` (the others lost to noise from other processes)."""
    results = []
    for _ in range(runs):
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        results.append(measured(argv))
    return min(results, key=lambda r: r["wall_s"])


def run(workdir: Path, quick: bool, methods: list[str], repeats: int) -> dict[str, object]:
    model = build_checkpoints(workdir, QUICK if quick else FULL)
    print(f"model: {model['parameters'] / 1e6:.1f}M parameters, {model['model_mb']:.0f} MB float32, largest tensor "
          f"{model['largest_tensor_mb']:.0f} MB; workdir {workdir}", flush=True)
    files = [str(workdir / n / "model.safetensors") for n in ("ancestor", "a", "b")]
    ceiling_out = workdir / "ceiling.safetensors"
    measured(python(_CEILING, *files, str(ceiling_out)))  # warm the page cache and the import caches
    startup = best_of(repeats, python(_STARTUP))
    ceiling = best_of(repeats, python(_CEILING, *files, str(ceiling_out)), cleanup=ceiling_out)
    memory_target = 2 * model["largest_tensor_mb"] + model["model_mb"]
    rows = []
    for method in methods:
        argv = merge_command(workdir, method)
        result = best_of(repeats, argv, cleanup=workdir / f"out_{method}")
        shutil.rmtree(workdir / f"out_{method}", ignore_errors=True)
        row = {
            "method": method, "random": method in RANDOM, **result,
            "time_ratio": result["wall_s"] / ceiling["wall_s"],
            "net_time_ratio": (result["wall_s"] - startup["wall_s"]) / (ceiling["wall_s"] - startup["wall_s"]),
            "net_rss_mb": result["peak_rss_mb"] - startup["peak_rss_mb"],
        }
        row["time_ok"] = row["random"] or row["time_ratio"] <= 1.5
        row["memory_ok"] = row["net_rss_mb"] <= memory_target
        rows.append(row)
        print(f"  {method}: {row['wall_s']:.1f}s ({row['time_ratio']:.2f}x ceiling), peak RSS "
              f"{row['peak_rss_mb']:.0f} MB", flush=True)
    return {"model": model, "startup": startup, "ceiling": ceiling, "memory_target_mb": memory_target,
            "methods": rows}


def table(results: dict[str, object]) -> str:
    """Returns the markdown table of the results."""
    s, c = results["startup"], results["ceiling"]
    lines = [
        "| operator | wall s | x ceiling | x ceiling (net of startup) | peak RSS MB | RSS - startup MB | time | memory |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        f"| startup (imports only) | {s['wall_s']:.1f} | | | {s['peak_rss_mb']:.0f} | 0 | | |",
        f"| I/O ceiling | {c['wall_s']:.1f} | 1.00 | 1.00 | {c['peak_rss_mb']:.0f} | "
        f"{c['peak_rss_mb'] - s['peak_rss_mb']:.0f} | | |",
    ]
    for r in results["methods"]:
        time_ok = "random (no target)" if r["random"] else ("ok" if r["time_ok"] else "MISSED")
        lines.append(
            f"| {r['method']} | {r['wall_s']:.1f} | {r['time_ratio']:.2f} | {r['net_time_ratio']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['net_rss_mb']:.0f} | {time_ok} | {'ok' if r['memory_ok'] else 'MISSED'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~10M-parameter model instead of 134M")
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--repeats", type=int, default=1, help="runs per measurement; the fastest counts")
    p.add_argument("--workdir", help="where the temp checkpoints go (default: a new temp dir, removed after)")
    p.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="colearn-bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(workdir).free / 2**30
    need_gb = 0.6 * 5 if not args.quick else 0.2
    if free_gb < need_gb:
        sys.exit(f"only {free_gb:.1f} GB free at {workdir}; the benchmark needs ~{need_gb:.1f} GB")
    started = time.perf_counter()
    try:
        results = run(workdir, args.quick, args.methods, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["command"] = "python benchmarks/merge.py " + " ".join(sys.argv[1:])
    results["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "free_disk_gb": round(free_gb, 1)}
    results["seconds"] = time.perf_counter() - started
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
