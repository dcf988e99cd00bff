"""Benchmark of `colearn merge`: time and peak memory of every operator against the I/O ceiling.

    python benchmarks/merge.py            # a 134M-parameter Llama (hidden 768, 12 layers, vocab 32000)
    python benchmarks/merge.py --quick    # a 10M-parameter Llama

Three checkpoints (ancestor and two perturbed partners, float32, one safetensors file each)
are written to a temp dir (removed after).  Every measurement is a fresh subprocess that
imports what `colearn merge` imports, then runs its work phase and times it itself: for an
operator, `colearn.cli.merge.main([...])` (all of `colearn merge` but the argv dispatch);
for the I/O ceiling, the same streaming writer (`colearn.merging.streaming`: the ancestor's header,
tensors written at their offsets, fsync, rename) fed with the ancestor's tensors while every
partner tensor is read into one reused buffer: reading the inputs and writing the output
with no arithmetic, through the same pipeline (`colearn.merging.streaming.outputs`: read ahead,
compute, write).  Peak RSS, its mapped-file part and private memory are sampled from /proc
(see `measured`).  Inputs sit in the page cache (they were just
written), so the ceiling is a warm-cache one.  Start-up (`startup`): fresh processes of
`python -c 'import torch'`, of `colearn merge` stopped at its first merged tensor, and of the
whole command, fastest of --repeats each.

Targets: the work phase's wall time within `TIME_TARGET` (3x) the ceiling's for the
deterministic operators, whose merges are torch code (`colearn.operators`: eager tensor
operations on chunks, no compiled loops).  Each operator runs --repeats times, each run
right after a run of the ceiling, and its fastest run is compared with the fastest of those
ceiling runs (writing back 512 MB and the fsync make single runs vary by up to 2x, so
operator and ceiling are measured in the same stretch of time; CPU time is reported beside
it); private (anonymous) memory above the post-import level below
2 x the largest tensor + the model being written.  One torch thread per subprocess unless
--threads.
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
MB = 2**20
FULL = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 2048,
    "vocab_size": 32000,
    "num_attention_heads": 12,
}
QUICK = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "intermediate_size": 704,
    "vocab_size": 8000,
    "num_attention_heads": 4,
}
# operator -> recipe, with the densities of conf/merge/*.yaml
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
TIME_TARGET = 3.0  # a deterministic operator's wall time at most this many times the I/O ceiling's

_RUNNER = """\
import colearn.cli.merge
import json, sys, time
import os
if int(os.environ.get("COLEARN_BENCH_WARM_MB", "0")):  # see `measured`
    import numpy as np; np.ones(int(os.environ["COLEARN_BENCH_WARM_MB"]) << 20, dtype=np.uint8)
startup_anon = int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
print("started", flush=True)  # the parent samples memory from here on
wall, cpu = time.perf_counter(), time.process_time()
{work}
print(json.dumps({{"work_wall_s": time.perf_counter() - wall, "work_cpu_s": time.process_time() - cpu,
                  "startup_anon_mb": startup_anon / 1024}}))
"""
MERGE = _RUNNER.format(work="colearn.cli.merge.main(sys.argv[1:])")
CEILING = _RUNNER.format(
    work=textwrap.dedent("""\
    from safetensors import safe_open
    from colearn.merging.streaming import atomic_file, outputs, read_layout, write_like
    base, partners, out = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    layout = read_layout(base)
    handles = [safe_open(p, "pt") for p in (base, *partners)]

    def copied(key, base, partners, out, planned):  # what a merge reads and writes, with no arithmetic
        for partner in partners:
            partner.sum()  # read, as a merge's pass reads it
        flat = out[: base.numel()]
        flat.copy_(base.reshape(-1))  # read, and written where a merge writes its result
        return flat.view_as(base)

    with atomic_file(out) as f:
        write_like(layout, outputs(layout, handles[0], handles[1:], copied), f)
""")
)


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


def measured(code: str, args: list[str], threads: int, warm_mb: int = 0) -> dict[str, float]:
    """Runs `python -c code *args`; returns its work phase's wall and CPU time (s) and memory (MB).

    Memory: the child's resident memory sampled from /proc every 10 ms during its work phase:
    peak RSS, and private (anonymous) RSS, peak and above its value after the imports ("work").
    RSS also counts the pages of the memory-mapped input files that safetensors has touched;
    those are the page cache, shared and dropped by the kernel at need, so the target is
    checked on the anonymous part.

    With `warm_mb`, the child first touches and frees that much memory, before its work
    phase: on a VM that hands freed memory back to its host (free page reporting, as here),
    a page touched again first costs a host fault (~2.5 us a 4 KiB page, ~1.2 s for the
    512 MB a merge writes), which otherwise decides the timings.  On a machine without it,
    warming changes nothing.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "COLEARN_BENCH_WARM_MB": str(warm_mb),
    }
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=out, stderr=err)
        peak_anon = peak_file = peak_rss = 0.0
        while True:
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if os.fstat(out.fileno()).st_size:  # the work phase has started (after the imports and the warming)
                anon, file = _rss_parts(child.pid)
                peak_anon, peak_file, peak_rss = max(peak_anon, anon), max(peak_file, file), max(peak_rss, anon + file)
            time.sleep(0.01)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise RuntimeError(f"benchmark subprocess failed: {err.read().decode()[-2000:]}")
        work = json.loads(out.read().decode().strip().splitlines()[-1])
    return {
        "wall_s": work["work_wall_s"],
        "cpu_s": work["work_cpu_s"],
        "peak_rss_mb": peak_rss,
        "peak_anon_mb": peak_anon,
        "peak_file_mb": peak_file,
        "work_anon_mb": peak_anon - work["startup_anon_mb"],
    }


def _rss_parts(pid: int) -> tuple[float, float]:
    """Returns (anonymous, file-backed) resident memory of a process in MB, (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile")))
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    return (int(fields.get("RssAnon", "0 kB").split()[0]) / 1024, int(fields.get("RssFile", "0 kB").split()[0]) / 1024)


def fresh(output: Path) -> None:
    shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)


def interleaved(
    runs: int,
    code: str,
    args: list[str],
    ceiling_args: list[str],
    threads: int,
    warm_mb: int,
    output: Path,
    ceilings: list[dict[str, float]],
) -> dict[str, float]:
    """Returns the fastest (wall) of `runs` runs of `code`, each right after a run of the I/O ceiling, whose results
    go to `ceilings`: the page cache and the disk's write-back then vary alike for both."""
    results = []
    for _ in range(runs):
        fresh(Path(ceiling_args[-1]))
        ceilings.append(measured(CEILING, ceiling_args, threads, warm_mb))
        fresh(output)
        results.append(measured(code, args, threads, warm_mb))
    fresh(output)
    return min(results, key=lambda r: r["wall_s"])


FIRST_TENSOR = """\
import os, sys
import colearn.merging.streaming as streaming
from colearn.cli.main import main
streaming.merge_tensor = lambda *args, **kwargs: os._exit(0)  # the first merged tensor ends the start-up
sys.argv = ["colearn", "merge", *sys.argv[1:]]
main()
"""


def startup(workdir: Path, repeats: int, threads: int) -> dict[str, float]:
    """Returns the fastest of `repeats` wall times (s) of fresh processes, taken in turn: `python -c 'import torch'`,
    `colearn merge` (linear) up to its first merged tensor, and the whole `colearn merge` command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = merge_args(workdir, "linear")
    out = workdir / "out_linear"
    commands = {
        "import_torch_s": [sys.executable, "-c", "import torch"],
        "first_tensor_s": [sys.executable, "-c", FIRST_TENSOR, *args],
        "end_to_end_s": [sys.executable, "-m", "colearn.cli", "merge", *args],
    }
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, command in commands.items():
            fresh(out)
            started = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    fresh(out)
    for tmp in workdir.glob(".out_linear.tmp-*"):  # left by the runs stopped at their first tensor
        fresh(tmp)
    return best


def merge_args(workdir: Path, method: str) -> list[str]:
    import yaml

    recipe = workdir / f"{method}.yaml"
    recipe.write_text(yaml.safe_dump(RECIPES[method]), encoding="utf-8")
    return [
        "--base",
        str(workdir / "ancestor"),
        "--recipe",
        str(recipe),
        "--out",
        str(workdir / f"out_{method}"),
        str(workdir / "a"),
        str(workdir / "b"),
    ]


def run(workdir: Path, quick: bool, methods: list[str], repeats: int, threads: int, warm_mb: int) -> dict[str, object]:
    model = build_checkpoints(workdir, QUICK if quick else FULL)
    print(
        f"model: {model['parameters'] / 1e6:.1f}M parameters, {model['model_mb']:.0f} MB float32, largest tensor "
        f"{model['largest_tensor_mb']:.0f} MB; workdir {workdir}",
        flush=True,
    )
    files = [str(workdir / n / "model.safetensors") for n in ("ancestor", "a", "b")]
    ceiling_args = [*files, str(workdir / "ceiling.safetensors")]
    os.sync()  # the inputs' write-back would otherwise compete with the first measurements' writes and fsyncs
    measured(CEILING, ceiling_args, threads, warm_mb)  # warms the page cache
    memory_target = 2 * model["largest_tensor_mb"] + model["model_mb"]
    started = startup(workdir, repeats, threads)
    print(
        f"  start-up: import torch {started['import_torch_s']:.2f}s; colearn merge (linear) to its first tensor "
        f"{started['first_tensor_s']:.2f}s, whole command {started['end_to_end_s']:.2f}s",
        flush=True,
    )
    ceilings: list[dict[str, float]] = []
    rows = []
    for method in methods:
        paired: list[dict[str, float]] = []
        result = interleaved(
            repeats,
            MERGE,
            merge_args(workdir, method),
            ceiling_args,
            threads,
            warm_mb,
            workdir / f"out_{method}",
            paired,
        )
        ceiling = min(paired, key=lambda r: r["wall_s"])  # under the same conditions as this operator's runs
        ceilings += paired
        row = {
            "method": method,
            "random": method in RANDOM,
            **result,
            "ceiling_wall_s": ceiling["wall_s"],
            "ceiling_cpu_s": ceiling["cpu_s"],
            "wall_ratio": result["wall_s"] / ceiling["wall_s"],
            "cpu_ratio": result["cpu_s"] / ceiling["cpu_s"],
        }
        row["time_ok"] = row["wall_ratio"] <= TIME_TARGET
        row["memory_ok"] = row["work_anon_mb"] <= memory_target
        rows.append(row)
        print(
            f"  {method}: {row['wall_s']:.2f}s wall ({row['wall_ratio']:.2f}x its ceiling's {ceiling['wall_s']:.2f}s)"
            f", {row['cpu_s']:.2f}s CPU ({row['cpu_ratio']:.2f}x), work anon RSS {row['work_anon_mb']:.0f} MB",
            flush=True,
        )
    return {
        "model": model,
        "startup": started,
        "ceiling": min(ceilings, key=lambda r: r["wall_s"]),
        "ceiling_walls_s": [c["wall_s"] for c in ceilings],
        "memory_target_mb": memory_target,
        "methods": rows,
    }


def table(results: dict[str, object]) -> str:
    """Returns the markdown table of the results: each operator against the ceiling runs interleaved with it."""
    lines = [
        "| operator | wall s | its ceiling wall s | wall x ceiling | CPU s | CPU x ceiling | peak RSS MB | "
        f"of it mapped files MB | work anon MB | time (wall <= {TIME_TARGET:g}x) | memory (work anon <= "
        f"{results['memory_target_mb']:.0f} MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results["methods"]:
        verdict = "no target (random)" if r["random"] else "ok" if r["time_ok"] else "missed"
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} | {r['ceiling_wall_s']:.2f} | {r['wall_ratio']:.2f} | "
            f"{r['cpu_s']:.2f} | {r['cpu_ratio']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_file_mb']:.0f} | "
            f"{r['work_anon_mb']:.0f} | {verdict} | {'ok' if r['memory_ok'] else 'missed'} |"
        )
    c = results["ceiling"]
    lines.append(
        f"\nI/O ceiling: fastest of {len(results['ceiling_walls_s'])} runs {c['wall_s']:.2f} s wall, "
        f"{c['cpu_s']:.2f} s CPU, {c['work_anon_mb']:.0f} MB work anon; median "
        f"{sorted(results['ceiling_walls_s'])[len(results['ceiling_walls_s']) // 2]:.2f} s wall."
    )
    if "startup" in results:
        s = results["startup"]
        lines.append(
            f"Start-up (fastest of --repeats fresh processes): `python -c 'import torch'` "
            f"{s['import_torch_s']:.2f} s; `colearn merge` (linear) to its first merged tensor "
            f"{s['first_tensor_s']:.2f} s ({s['first_tensor_s'] / s['import_torch_s']:.2f}x), the whole "
            f"command {s['end_to_end_s']:.2f} s."
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 10M-parameter model instead of 134M")
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest (wall) counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each subprocess (OMP_NUM_THREADS)")
    p.add_argument(
        "--warm-mb",
        type=int,
        default=2048,
        help="memory each measured process touches and frees before its work phase (0: none; see measured)",
    )
    p.add_argument("--workdir", help="where the temp checkpoints go (default: a new temp dir, removed after)")
    p.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="colearn-bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(workdir).free / 2**30
    need_gb = 0.2 if args.quick else 3.0  # 3 inputs + the largest output + the ceiling's, 0.5 GB each
    if free_gb < need_gb:
        sys.exit(f"only {free_gb:.1f} GB free at {workdir}; the benchmark needs ~{need_gb:.1f} GB")
    started = time.perf_counter()
    try:
        results = run(workdir, args.quick, args.methods, args.repeats, args.threads, args.warm_mb)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["command"] = " ".join(["python", "benchmarks/merge.py", *sys.argv[1:]])
    results["machine"] = {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "warm_mb": args.warm_mb,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "free_disk_gb": round(free_gb, 1),
    }
    results["seconds"] = time.perf_counter() - started
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
