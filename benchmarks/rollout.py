"""Benchmark: environment steps per second of the batched rollout.

Compares `colearn.rollout.collect` with num_envs=N (one batched forward pass per step) against
  - the one-environment-at-a-time loop: the same partner and env through `collect` with num_envs=1
    (one forward pass per step per env), and
  - the forward-pass ceiling: `colearn.policy.legal_action_logprobs` (what constrained acting calls) on a
    batch of N real prompts of the env, timed in a loop under torch.no_grad; steps/s = N x forwards/s.

The partner is the default tiny model (colearn.config.ModelConfig(): hidden 64, 2 layers), untrained,
so it acts at random and episodes end in holes fast (the table notes the mean episode length).
Every number is the median of a few repetitions after a warm-up; each rollout reuses a vector env made
once beforehand, as the training loop does (colearn.loop.Context.venvs). The num_envs=1 rows are the
one-at-a-time loop itself.

Constrained acting scores each distinct observation of a step once, so on small maps (16 or 64
states, many envs on the same cell) the rollout forwards fewer prompts than it has envs and can beat
the "ceiling" of N prompts per forward: the last column shows the prompts per forward pass.

Torch runs on one thread by default (--threads): on a small shared machine, torch's default of one
thread per core stalls whenever another process holds a core, which swamps what is measured here.

    python benchmarks/rollout.py            # full run (< 3 minutes on 2 CPU cores)
    python benchmarks/rollout.py --quick    # short run

Prints a markdown table and writes JSON (with machine info and the command) to
benchmarks/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import gymnasium
import torch
import transformers

from colearn.config import EnvSpec, ModelConfig, RolloutConfig
from colearn.experience.rollout import EpisodeMeta, collect, env_info
from colearn.loop import env_corpus
from colearn.models.build import build_ancestor
from colearn.models.partner import Partner
from colearn.models.policy import legal_action_logprobs

ENVS = ["colearn/FrozenLake-v0", "colearn/FrozenLake8x8-v0"]
NUM_ENVS = [1, 16, 64, 256]
RESULTS = Path(__file__).parent / "results" / "rollout.json"


def build_partner() -> Partner:
    """Returns the untrained default tiny partner built from FrozenLake-v0 text (seed 0)."""
    cfg = ModelConfig()
    texts, names = env_corpus([EnvSpec("colearn/FrozenLake-v0")])
    model, tokenizer = build_ancestor(cfg, texts, names, seed=0)
    model.eval()
    return Partner("bench", model, tokenizer, cfg)


class ForwardCounter:
    """Counts the model's forward passes and the prompts they carry (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = self.rows = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        self.rows += len(kwargs["input_ids"] if "input_ids" in kwargs else args[0])


def rollout_rate(
    partner: Partner, spec: EnvSpec, num_envs: int, episodes: int, reps: int, counter: ForwardCounter
) -> dict:
    """Returns median steps/s of `collect` over `reps` runs of `episodes` episodes with `num_envs` envs."""
    cfg = RolloutConfig(episodes=episodes, group_size=1, num_envs=num_envs)
    # the vector env is made once and reused across calls, as the training loop does (colearn.loop.Context.venvs)
    venvs: dict = {}
    collect(
        partner,
        spec,
        list(range(min(episodes, num_envs))),
        cfg,
        torch.Generator().manual_seed(0),
        EpisodeMeta(partner=partner.name),
        venvs=venvs,
    )
    rates, steps = [], 0
    calls0, rows0 = counter.calls, counter.rows
    for _ in range(reps):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        rows = collect(
            partner, spec, list(range(episodes)), cfg, generator, EpisodeMeta(partner=partner.name), venvs=venvs
        )
        rates.append(len(rows) / (time.perf_counter() - start))
        steps += len(rows)
    return {
        "steps_per_s": statistics.median(rates),
        "runs_steps_per_s": rates,
        "episodes": episodes,
        "steps": steps // reps,
        "mean_episode_length": steps / (reps * episodes),
        "forwards_per_step": (counter.calls - calls0) / steps,
        "prompts_per_forward": (counter.rows - rows0) / max(counter.calls - calls0, 1),
    }


def forward_rate(partner: Partner, prompts: list[list[int]], legal: list[str], reps: int, seconds: float) -> dict:
    """Returns median forwards/s of `legal_action_logprobs` on the batch `prompts` (no_grad)."""
    action_ids = partner.action_ids(legal)
    pad = partner.tokenizer.pad_token_id
    rates = []
    with torch.no_grad():
        for _ in range(3):  # warm-up
            legal_action_logprobs(partner.model, prompts, action_ids, pad)
        for _ in range(reps):
            n, start = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - start < seconds:
                legal_action_logprobs(partner.model, prompts, action_ids, pad)
                n += 1
            rates.append(n / (time.perf_counter() - start))
    return {"forwards_per_s": statistics.median(rates), "runs_forwards_per_s": rates}


def real_prompts(partner: Partner, spec: EnvSpec, n: int) -> list[list[int]]:
    """Returns `n` prompts of observations met by a random walk in the env (all of one length for FrozenLake)."""
    cfg = RolloutConfig(episodes=8, group_size=1, num_envs=8)
    rows = collect(partner, spec, list(range(8)), cfg, torch.Generator().manual_seed(1), EpisodeMeta())
    seen = [r["prompt_ids"] for r in rows]
    return [seen[i % len(seen)] for i in range(n)]


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "gymnasium": gymnasium.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, fewer episodes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 1 if args.quick else 3
    # episodes per env slot: the more, the smaller the share of the run spent in the tail where the
    # last long episodes play out in a nearly empty batch
    per_slot = 1 if args.quick else 4
    # the one-at-a-time loop plays ~500 steps (8x8 episodes are ~4x longer)
    single_episodes = {
        "colearn/FrozenLake-v0": 16 if args.quick else 48,
        "colearn/FrozenLake8x8-v0": 4 if args.quick else 12,
    }
    seconds = 0.2 if args.quick else 0.4
    t0 = time.perf_counter()
    info = {**machine_info(), "torch_default_threads": default_threads}
    partner = build_partner()
    counter = ForwardCounter(partner.model)
    results = []
    for env_id in ENVS:
        spec = EnvSpec(env_id)
        legal = env_info(spec)["action_names"]
        rollout_rate(partner, spec, 16, 16, 1, counter)  # warm-up
        single = rollout_rate(partner, spec, 1, single_episodes[env_id], reps, counter)
        for n in NUM_ENVS:
            prompts = real_prompts(partner, spec, n)
            ceiling = forward_rate(partner, prompts, legal, reps, seconds)
            batched = single if n == 1 else rollout_rate(partner, spec, n, max(n * per_slot, 16), reps, counter)
            ceiling_steps = n * ceiling["forwards_per_s"]
            results.append(
                {
                    "env": spec.name,
                    "env_id": env_id,
                    "num_envs": n,
                    "prompt_tokens": len(prompts[0]),
                    "batched": batched,
                    "one_at_a_time": single,
                    "ceiling": ceiling,
                    "speedup": batched["steps_per_s"] / single["steps_per_s"],
                    "ceiling_steps_per_s": ceiling_steps,
                    "fraction_of_ceiling": batched["steps_per_s"] / ceiling_steps,
                }
            )
            print(f"  {spec.name} N={n}: {batched['steps_per_s']:.0f} steps/s", file=sys.stderr)
    info["load_average_end"] = os.getloadavg()
    table = markdown(results)
    print(table)
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "quick": args.quick,
        "repetitions": reps,
        "machine": info,
        "model": {
            "hidden_size": partner.cfg.hidden_size,
            "num_layers": partner.cfg.num_layers,
            "parameters": sum(p.numel() for p in partner.model.parameters()),
        },
        "wall_seconds": time.perf_counter() - t0,
        "results": results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} in {out['wall_seconds']:.0f} s", file=sys.stderr)


def markdown(results: list[dict]) -> str:
    lines = [
        "| env | num_envs | steps/s batched rollout | steps/s one-at-a-time | speedup | forward ceiling steps/s "
        "| fraction of ceiling | mean episode length | prompts per forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['env']} | {r['num_envs']} | {r['batched']['steps_per_s']:.0f} "
            f"| {r['one_at_a_time']['steps_per_s']:.0f} | {r['speedup']:.1f}x "
            f"| {r['ceiling_steps_per_s']:.0f} | {r['fraction_of_ceiling']:.2f} "
            f"| {r['batched']['mean_episode_length']:.1f} | {r['batched']['prompts_per_forward']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
