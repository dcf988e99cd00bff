"""GPU smoke test: one generation of two LoRA partners on a tiny Qwen2, in bfloat16, on a CUDA device.

Builds a randomly initialized Qwen2 (2 layers, hidden 64, grouped-query attention) with a character tokenizer from
the FrozenLake text (no action name is one token, as with a real model's tokenizer), saves it to a temporary
directory, and runs the real loop on it (`model=local`, the default two maps, partners A and B as LoRA adapters)
for one generation in each precision variant:

    bf16            model.dtype=bfloat16: weights in bfloat16 (the LoRA adapters stay float32, peft's default)
    bf16-mixed      model.dtype=float32 model.autocast=bfloat16 (mixed precision), with gradient checkpointing and
                    gradient accumulation (learn.micro_batch_size=64)
    bf16-generate   model.dtype=bfloat16 env=addition: one-digit sums answered by generation (the KV cache, every
                    live episode of a vector env in one batch), both partners on the same task

For each it reports the wall seconds of every phase of the loop (act, learn, eval, dynamics, integrate, breed,
save_generation, checkpoint, store; summed from the loop's "timing" events in metrics.jsonl) and the peak CUDA
memory allocated in it (torch.cuda.max_memory_allocated, reset as each phase starts: resident weights included).
Peak memory is read by wrapping the loop's phase timer (`colearn.loop.Context.timed`) from this script, so the loop
itself knows nothing of it.

    python benchmarks/gpu_smoke.py                         # on CUDA; without it, prints one line and exits 0
    python benchmarks/gpu_smoke.py --device cpu            # a dry run of the same code on the CPU (no memory column)
    python benchmarks/gpu_smoke.py --variants bf16 -- model=qwen2_5_0_5b_lora model.source=DIR   # a real model

Hydra overrides after `--` apply to every variant (after the tiny Qwen2's, so `model=...` replaces it). Prints a
markdown table per variant and writes JSON (device, versions, the command) to benchmarks/results/gpu_smoke.json
(`--device cpu`: gpu_smoke_cpu.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
LAKE = "colearn/FrozenLake-v0"
QWEN2 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
VARIANTS = {
    "bf16": ["model.dtype=bfloat16"],
    "bf16-mixed": [
        "model.dtype=float32",
        "model.autocast=bfloat16",
        "model.gradient_checkpointing=true",
        "learn.micro_batch_size=64",
    ],
    "bf16-generate": ["model.dtype=bfloat16", "env=addition", "integrate.modes=[]"],
}
ONE_GENERATION = [
    "loop.generations=1",
    "loop.rounds=2",
    "rollout.episodes=64",
    "rollout.num_envs=64",
    "learn.epochs=10",
    "eval.episodes=8",
    "probe_size=8",
    "progress=false",
]


def tiny_qwen2(root: Path) -> Path:
    """Saves a randomly initialized tiny Qwen2 and a character tokenizer of the lake's text to root/qwen2."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from colearn.config import EnvSpec
    from colearn.loop import env_corpus
    from colearn.models.build import build_tokenizer

    texts, _ = env_corpus([EnvSpec(LAKE)])
    tokenizer = build_tokenizer(texts, [], "{obs}\nAction:")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **QWEN2,
    )
    torch.manual_seed(0)
    path = root / "qwen2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class PhasePeaks:
    """Within its block, records the peak CUDA memory allocated in each phase the loop times (MiB): the loop's
    `Context.timed` is wrapped so that each phase starts from a reset peak."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.mib: dict[str, float] = {}

    def __enter__(self) -> PhasePeaks:
        from colearn import loop

        self._original = original = loop.Context.timed
        peaks = self

        @contextmanager
        def timed(ctx: Any, phase: str):
            if peaks.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with original(ctx, phase):
                yield
            if peaks.cuda:
                torch.cuda.synchronize()  # the phase's kernels have run: its time and memory are its own
                peak = torch.cuda.max_memory_allocated() / 2**20
                peaks.mib[phase] = max(peaks.mib.get(phase, 0.0), peak)

        loop.Context.timed = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        from colearn import loop

        loop.Context.timed = self._original


def phase_seconds(run_dir: Path) -> dict[str, float]:
    """Returns the wall seconds of each phase, summed over the run's "timing" events."""
    from colearn.rundir.logger import read_metrics

    seconds: dict[str, float] = {}
    for event in read_metrics(run_dir):
        if event.get("event") == "timing":
            for key, value in event.items():
                if key.startswith("time/"):
                    seconds[key[5:]] = seconds.get(key[5:], 0.0) + value
    return seconds


def run_variant(name: str, overrides: list[str], run_dir: Path, cuda: bool) -> dict[str, Any]:
    """Runs one generation with `overrides`; returns its wall time, env steps, per-phase seconds and peaks."""
    import hydra
    from hydra import compose

    from colearn import loop
    from colearn.cli import experiment as cli

    with hydra.initialize_config_dir(config_dir=cli.CONF_DIR, version_base=None):
        cfg = cli.to_config(compose("config", overrides=overrides))
    cli.validate(cfg)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PhasePeaks(cuda) as peaks:
        state = loop.run(cfg, run_dir)
    wall = time.perf_counter() - start
    seconds = phase_seconds(run_dir)
    result = {
        "overrides": overrides,
        "wall_s": round(wall, 2),
        "env_steps": state.env_steps,
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "phases": {
            phase: {"wall_s": round(s, 3), "peak_mib": round(peaks.mib[phase], 1) if phase in peaks.mib else None}
            for phase, s in sorted(seconds.items(), key=lambda kv: -kv[1])
        },
        "offspring_greedy": {
            s.env: round(s.normalized, 3) for s in state.last_scores.get("offspring", []) if s.policy == "greedy"
        },
    }
    del state
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def table(name: str, result: dict[str, Any]) -> str:
    """Returns the variant's per-phase markdown table."""
    peak = "n/a" if result["peak_mib"] is None else f"{result['peak_mib']:.1f}"
    lines = [
        f"### {name}: {result['wall_s']:.1f} s, {result['env_steps']} env steps, peak {peak} MiB",
        "",
        "| phase | wall s | peak MiB |",
        "|---|---:|---:|",
    ]
    for phase, p in result["phases"].items():
        mib = "n/a" if p["peak_mib"] is None else f"{p['peak_mib']:.1f}"
        lines.append(f"| {phase} | {p['wall_s']:.3f} | {mib} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, help="JSON path (default: results/gpu_smoke.json, gpu_smoke_cpu.json on cpu)")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --, applied to every variant")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"gpu_smoke: skipped: no CUDA device here (torch {torch.__version__}); --device cpu runs it on the CPU")
        return
    from colearn.cli import experiment as cli

    cli.quiet_libraries()
    cli.register_configs()
    torch.set_num_threads(1)
    out = args.out or RESULTS / ("gpu_smoke.json" if cuda else "gpu_smoke_cpu.json")
    with tempfile.TemporaryDirectory(prefix="colearn-gpu-smoke-") as tmp:
        root = args.keep or Path(tmp)
        model = tiny_qwen2(Path(tmp))
        base = ["model=local", f"model.source={model}", "model.lora_rank=8", "model.lora_targets=[]"]
        results = {}
        for name in args.variants:
            overrides = [*base, f"device={args.device}", *ONE_GENERATION, *VARIANTS[name], *args.overrides]
            results[name] = run_variant(name, overrides, root / name, cuda)
            print(table(name, results[name]) + "\n", flush=True)
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": {"type": "qwen2", **QWEN2, "lora_rank": 8},
        "variants": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
