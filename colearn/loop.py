"""The generation loop: the one place that knows the order of phases.

    ancestor -> partners act in their envs -> experience store
    each round, each partner: distill(partner's successes) + RL(own steps + partner's steps)
    after R rounds: merge(partners | ancestor) -> offspring -> evaluated -> next ancestor

With merge.fallback=mixture, an offspring that is not a merge is the partners routed per env: it is
evaluated and saved as that mixture (`colearn.breeding.mixture`), while the best partner's copy seeds the next
generation (a mixture has no single set of weights to copy into the partners). With merge.fallback=cluster its
members are the merges of the compatible clusters and the partners left alone; a partner of a merged cluster
starts the next generation from its cluster's merge (`Offspring.next_partners`).

May import: config, errors, models, experience, learning, rundir, backends, merging, breeding, analysis.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from colearn.analysis.dynamics import forgetting, main_scores, pair_metrics, probe_set, transfer
from colearn.backends.registry import Backend, make_backend
from colearn.backends.work import Episodes, Lesson
from colearn.breeding.compatibility import Compatibility, measure
from colearn.breeding.integrate import ModeParams, evaluate_modes
from colearn.breeding.kinds import Clustered, Merged, Mixture, Offspring
from colearn.breeding.mixture import route_params, save_mixture
from colearn.breeding.offspring import make_offspring
from colearn.config import Config, EnvSpec, pretraining_config
from colearn.errors import ColearnError
from colearn.experience.evaluate import (
    EnvScore,
    env_scorer,
    evaluate,
    headline,
    mean_over_envs,
    normalized_by_env,
    random_transition_envs,
    return_scorer,
)
from colearn.experience.rollout import EpisodeMeta, env_info, group_seeds
from colearn.experience.store import ExperienceStore
from colearn.learning.learn import select_for_distillation
from colearn.models.build import build_ancestor, resolve_device
from colearn.models.partner import Partner
from colearn.rundir.checkpoint import latest_generation, latest_intact, load_checkpoint, mark_resumable, save_checkpoint
from colearn.rundir.deployment import deploys, prune_generations, write_json_atomic
from colearn.rundir.logger import Logger, truncate_metrics
from colearn.rundir.runlock import RunLock
from colearn.rundir.signals import StopOnSignal

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything the loop needs to continue: checkpoint this and the run can resume exactly."""

    generation: int
    round: int
    ancestor: Partner
    partners: list[Partner]
    env_steps: int = 0
    lineage: list[dict[str, Any]] = field(default_factory=list)
    last_scores: dict[str, list[EnvScore]] = field(default_factory=dict)
    score_history: list[dict[str, dict[str, float]]] = field(default_factory=list)  # per generation, for forgetting
    stopped_by: str | None = None  # the signal that stopped the run early, if any


@dataclass
class Context:
    """What stays fixed during a run."""

    cfg: Config
    run_dir: Path
    store: ExperienceStore
    log: Logger
    suite: dict[str, EnvSpec]
    stop: StopOnSignal | None = None
    probe: list[str] = field(default_factory=list)  # fixed observations on which partners' hidden states are compared
    compat: Compatibility | None = None  # the partners' compatibility as the last round left them (`log_dynamics`)
    venvs: dict[tuple[str, int], Any] = field(default_factory=dict)  # vector envs made once per run and reused
    backend: Backend | None = None  # where each partner acts, learns and is evaluated (config.backend)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per phase since the last "time" event
    bar: tqdm | None = None  # the run's progress bar: it names the phase the run is in
    random_envs: set[str] = field(default_factory=set)  # envs whose successes are partly luck: not imitated

    def show(self, phase: str) -> None:
        """Names the phase the run is in on its progress bar (which moves only once a round)."""
        if self.bar is not None:
            self.bar.set_description(f"colearn: {phase}")

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the wall time of the block to `phase` (logged by `log_times`) and shows the phase."""
        self.show(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def seed_for(cfg: Config, *path: int) -> int:
    """Returns a seed derived from the master seed and a position in the loop (so resumes replay it)."""
    return int(np.random.SeedSequence([cfg.seed, *path]).generate_state(1)[0])


def env_corpus(suite: list[EnvSpec], episodes: int = 4) -> tuple[list[str], list[str]]:
    """Returns (observation texts, action names) seen in a few random episodes of each env: the
    text a tokenizer is built from."""
    import gymnasium as gym

    texts, names = [], []
    for spec in suite:
        action_names = env_info(spec)["action_names"] or []
        names += action_names
        env = gym.make(spec.id, **spec.kwargs)
        for s in range(episodes):
            obs, _ = env.reset(seed=s)
            texts.append(obs)
            for _ in range(20):
                act = action_names[env.np_random.integers(len(action_names))] if action_names else "0"
                obs, _, term, trunc, _ = env.step(act)
                texts.append(obs)
                if term or trunc:
                    break
        env.close()
    return texts, names


def initial_state(cfg: Config, run_dir: Path) -> LoopState:
    """Returns generation 0: one ancestor, built from config or pretrained (`pretrained_ancestor`), copied into
    every partner. A signal that stopped pretraining stops the run too (`stopped_by`, no partners)."""
    if cfg.pretrain.rounds:
        ancestor, stopped_by = pretrained_ancestor(cfg, run_dir)
        if stopped_by:
            return LoopState(generation=0, round=0, ancestor=ancestor, partners=[], stopped_by=stopped_by)
    else:
        texts, names = env_corpus([*cfg.env.suite, *cfg.pretrain.suite])
        model, tokenizer = build_ancestor(cfg.model, texts, names, seed=cfg.seed)
        model = model.to(resolve_device(cfg.device))
        model.eval()
        ancestor = Partner("ancestor", model, tokenizer, cfg.model)
    partners = [ancestor.clone(p.name, p.envs) for p in cfg.env.partners_at(0)]
    return LoopState(generation=0, round=0, ancestor=ancestor, partners=partners)


def pretrained_ancestor(cfg: Config, run_dir: Path) -> tuple[Partner, str | None]:
    """Returns the ancestor that pretraining (`pretraining_config`, a run of its own in RUN_DIR/pretrain) ends with,
    and the signal that stopped it, if any. A finished pretraining run is read back, not run again; a stopped one
    continues where it stopped."""
    names = ", ".join(e.name for e in cfg.pretrain.suite)
    print(f"colearn: pretraining the ancestor, {cfg.pretrain.rounds} rounds on {names}, in {run_dir / 'pretrain'}")
    pre = run(pretraining_config(cfg), run_dir / "pretrain")
    return pre.ancestor, pre.stopped_by


def run(cfg: Config, run_dir: Path, state: LoopState | None = None, restart: bool = False) -> LoopState:
    """Runs the experiment to its last generation (or until SIGINT/SIGTERM, after a checkpoint);
    returns the final state. Without `state`, continues from the newest intact checkpoint if any (see
    `resume_state`; `restart` lets a run with none start over). The run directory is held throughout:
    another process running or resuming in it stops with ColearnError."""
    run_dir = Path(run_dir).resolve()  # the run_id of the step records is its name, even given as '.'
    with RunLock(run_dir):
        return run_held(cfg, run_dir, state, restart)


def run_held(cfg: Config, run_dir: Path, state: LoopState | None, restart: bool) -> LoopState:
    """`run`, once the run directory is held."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state = state or resume_state(cfg, run_dir, restart) or initial_state(cfg, run_dir)
    if state.stopped_by:  # a signal stopped pretraining: the run itself has not started
        return state
    ctx = Context(
        cfg,
        run_dir,
        ExperienceStore(run_dir / "experience"),
        Logger(run_dir, purge_step=state.env_steps),
        {e.name: e for e in cfg.env.suite},
    )
    total = cfg.loop.generations * cfg.loop.rounds
    with (
        make_backend(cfg, ctx.venvs) as backend,
        StopOnSignal(run_dir) as stop,
        tqdm(
            total=total,
            initial=state.generation * cfg.loop.rounds + state.round,
            disable=not cfg.progress,
            desc="colearn",
            unit="round",
        ) as bar,
    ):
        ctx.stop, ctx.bar, ctx.backend = stop, bar, backend
        with ctx.timed("start"):
            backend.push(state.partners)  # a Ray backend starts an actor per partner and loads it there
        ctx.probe = probe_set(cfg.env.suite, cfg.probe_size, cfg.seed)
        ctx.random_envs = random_transition_envs(cfg.env.suite, cfg.rollout.mode)
        if (state.generation, state.round, state.env_steps) == (0, 0, 0):
            state.last_scores["ancestor"] = assess(state.ancestor, "ancestor", state, ctx)  # chance level
        while state.generation < cfg.loop.generations and not stop.requested:
            run_generation(state, ctx, bar)
        bar.set_description("colearn")
    state.stopped_by = stop.requested
    for venv in ctx.venvs.values():
        venv.close()
    ctx.log.close()
    return state


def resume_state(cfg: Config, run_dir: Path, restart: bool = False) -> LoopState | None:
    """Returns the state of the newest intact round checkpoint in the run dir, else of the newest intact
    generation directory, with the experience store and metrics.jsonl cut back to what it had seen (so
    resumed rounds are neither lost nor doubled). With neither, returns None (start afresh) when the run has
    written nothing yet or `restart` is given (its metrics and experience are then dropped), and otherwise
    raises ColearnError: nothing is deleted that no checkpoint can replace."""
    root = run_dir / "checkpoints"
    path = latest_intact(root) if root.is_dir() else None
    if path is not None:
        meta, partners, ancestor = load_checkpoint(path, cfg)
        note = ""
    else:
        found = latest_generation(root, cfg) if root.is_dir() else None
        if found is None:
            return start_over(run_dir, restart)
        path, (meta, partners, ancestor), note = found
    log.info("continuing from %s", path)
    print(
        f"colearn: continuing from {path.relative_to(run_dir)} (generation {meta['generation']}, "
        f"round {meta['round']}){note}"
    )
    ExperienceStore(run_dir / "experience").truncate(meta["experience_shards"])
    truncate_metrics(run_dir, meta["metrics_lines"])
    return LoopState(
        meta["generation"],
        meta["round"],
        ancestor,
        partners,
        meta["env_steps"],
        meta["lineage"],
        meta["last_scores"],
        meta["score_history"],
    )


def start_over(run_dir: Path, restart: bool) -> None:
    """Clears what a run with no intact checkpoint wrote, when that is nothing or `restart` asks for it."""
    store = ExperienceStore(run_dir / "experience")
    metrics = run_dir / "metrics.jsonl"
    written = bool(store.shards) or (metrics.exists() and metrics.stat().st_size > 0)
    if written and not restart:
        raise ColearnError(
            f"run directory {str(run_dir)!r} has metrics or experience but no intact round or "
            "generation checkpoint to continue from; nothing was deleted. To discard them and start "
            f"over: colearn resume {run_dir} --restart"
        )
    if written:
        print(f"colearn: no intact checkpoint in {run_dir}; --restart: discarding its metrics and experience")
    store.truncate(0)
    truncate_metrics(run_dir, 0)
    # damaged round checkpoints would outrank the new run's by name when the newest are kept
    for damaged in (run_dir / "checkpoints").glob("round_g*"):
        shutil.rmtree(damaged, ignore_errors=True)


def checkpoint(state: LoopState, ctx: Context) -> None:
    """Writes a round-boundary checkpoint: the loop can resume exactly from here."""
    with ctx.timed("checkpoint"):
        ctx.log.sync()  # the metrics lines the checkpoint counts are on disk before it is
        path = save_checkpoint(
            ctx.run_dir / "checkpoints",
            state,
            {"experience_shards": len(ctx.store.shards), "metrics_lines": ctx.log.lines},
        )
        if state.round == 0 and state.generation > 0:  # a generation's end: its directory can seed a resume
            mark_resumable(ctx.run_dir / "checkpoints" / f"gen_{state.generation - 1:04d}", path)


def run_generation(state: LoopState, ctx: Context, bar: tqdm) -> None:
    """Plays, learns and evaluates R rounds, then breeds the offspring that seeds the next generation."""
    cfg = ctx.cfg
    while state.round < cfg.loop.rounds:
        with ctx.timed("sync"):
            ctx.backend.push(state.partners)  # places new partners where they run (none but after a merge or resume)
        with ctx.timed("act"):
            played = ctx.backend.play([episodes(p, i, state, ctx) for i, p in enumerate(state.partners)])
        for rows in played:
            state.env_steps += len(rows)
            with ctx.timed("store"):
                ctx.store.append(rows)
        teachers = snapshot_teachers(state.partners, cfg)
        lessons = [lesson(p, i, teachers.get(p.name, []), state, ctx) for i, p in enumerate(state.partners)]
        with ctx.timed("learn"):
            learned = ctx.backend.learn(lessons)
        for partner, taught, stats in zip(state.partners, lessons, learned):
            log_learning(partner, taught, stats, state, ctx)
        with ctx.timed("eval"):
            scores = ctx.backend.evaluate(list(ctx.suite.values()))
        with ctx.timed("sync"):  # the loop's copies as they learned: dynamics, checkpoint and merge read them
            ctx.backend.pull(state.partners)
        for partner, partner_scores in zip(state.partners, scores):
            log_scores(partner_scores, partner.envs, partner.name, state, ctx)
            state.last_scores[partner.name] = partner_scores
        with ctx.timed("dynamics"):
            log_dynamics(state, ctx)
        state.round += 1
        if state.round < cfg.loop.rounds:  # a generation's last round is timed with its end: one event a step
            log_times(state, ctx)
        checkpoint(state, ctx)
        bar.update(1)
        bar.set_postfix({p.name: f"{headline(state.last_scores[p.name]):.2f}" for p in state.partners})
        if ctx.stop.requested:
            return
    with ctx.timed("integrate"):
        assess_integration(state, ctx)
    with ctx.timed("breed"):
        offspring = breed(state, ctx)
    if isinstance(offspring, Mixture):
        child_scores = assess_mixture(offspring, state, ctx)
    else:
        child_scores = assess(offspring.partner, "offspring", state, ctx)
    state.last_scores["offspring"] = child_scores
    record_lineage(state, ctx, offspring, child_scores)
    with ctx.timed("save_generation"):
        save_generation(state, offspring, ctx)
    deploy(state, ctx)
    state.score_history.append(main_scores(state.last_scores))
    next_generation(state, offspring, ctx)
    log_times(state, ctx)
    checkpoint(state, ctx)


def log_times(state: LoopState, ctx: Context) -> None:
    """Logs the wall seconds spent per phase since the last such event (a checkpoint's falls in the next one)."""
    ctx.log.write(
        "timing",
        state.env_steps,
        generation=state.generation,
        round=state.round,
        **{f"time/{k}": round(v, 4) for k, v in ctx.seconds.items()},
    )
    ctx.seconds.clear()


def episodes(partner: Partner, index: int, state: LoopState, ctx: Context) -> list[Episodes]:
    """Returns the partner's episodes this round in each of its envs, seeded by their place in the loop."""
    cfg = ctx.cfg
    work = []
    for j, name in enumerate(partner.envs):
        path = (state.generation, state.round, index, j)
        seeds = group_seeds(
            np.random.default_rng(seed_for(cfg, 1, *path)), cfg.rollout.episodes, cfg.rollout.group_size
        )
        meta = EpisodeMeta(cfg.run_id or ctx.run_dir.name, state.generation, state.round, partner.name)
        work.append(Episodes(ctx.suite[name], seeds, seed_for(cfg, 2, *path), meta))
    return work


def snapshot_teachers(partners: list[Partner], cfg: Config) -> dict[str, list[Partner]]:
    """Returns, for mutual learning, each partner's peers as they were before this round's updates: frozen
    copies (one per partner, shared) of every other partner, as in deep mutual learning with more than two
    networks, where each learns from all the others (Zhang et al. 2018)."""
    if not cfg.learn.mutual_kl_coef or len(partners) < 2 or not cfg.loop.exchange:
        return {}
    frozen = [Partner(q.name, copy.deepcopy(q.model), q.tokenizer, q.cfg) for q in partners]
    return {p.name: [f for f in frozen if f.name != p.name] for p in partners}


def lesson(partner: Partner, index: int, teachers: list[Partner], state: LoopState, ctx: Context) -> Lesson:
    """Returns the partner's learning phase this round: its own and its peers' steps as the store holds them, the
    steps it imitates, and its seed (from its place in the loop)."""
    cfg = ctx.cfg
    here = {"generation": state.generation, "round": state.round}
    others = [p.name for p in state.partners if p is not partner] if cfg.loop.exchange else []
    with ctx.timed("store"):
        own = ctx.store.select(partner=partner.name, **here)
        peer = [r for o in others for r in ctx.store.select(partner=o, **here)]
    sources = {"peer": peer, "self": own, "both": own + peer}[cfg.learn.distill_from]
    lucky = set() if cfg.learn.distill_random_envs else {r["env"] for r in sources} & ctx.random_envs
    sources = [r for r in sources if r["env"] not in lucky]
    distill = select_for_distillation(sources, cfg.learn.distill_select, cfg.learn.distill_top_fraction)
    skipped = ""
    if cfg.learn.distill_coef and not distill:
        skipped = f"no {cfg.learn.distill_select} episodes from {cfg.learn.distill_from} this round"
        if lucky:
            skipped += f" outside {sorted(lucky)}, whose successes are partly luck (learn.distill_random_envs)"
    return Lesson(own, peer, distill, seed_for(cfg, 3, state.generation, state.round, index), teachers, skipped)


def log_learning(partner: Partner, taught: Lesson, stats: dict[str, float], state: LoopState, ctx: Context) -> None:
    """Logs one partner's learning phase: what it imitated from whom, its training statistics, any collapse."""
    here = {"generation": state.generation, "round": state.round}
    if taught.skipped:
        ctx.log.write("distill_skipped", state.env_steps, partner=partner.name, **here, reason=taught.skipped)
    from_peer = [r for r in taught.distill if r["partner"] != partner.name]
    stats["distill/from_peer_share"] = len(from_peer) / len(taught.distill) if taught.distill else 0.0
    # how the imitated peer actions fared: the mean return of the episodes they came from
    stats["distill/peer_episode_return"] = (
        sum(r["episode_return"] for r in from_peer) / len(from_peer) if from_peer else 0.0
    )
    ctx.log.write(
        "learn", state.env_steps, partner=partner.name, **here, **{f"{k}/{partner.name}": v for k, v in stats.items()}
    )
    warn_on_collapse(partner, stats, ctx.cfg, ctx, state)


def warn_on_collapse(partner: Partner, stats: dict[str, float], cfg: Config, ctx: Context, state: LoopState) -> None:
    """Logs a warning when the partner's rewards stopped varying or its policy stopped exploring."""
    problems = []
    if stats["learn/reward_std"] == 0.0 and cfg.learn.advantage == "episode":
        problems.append("reward variance is 0 (every episode scored the same: no group-relative signal)")
    if stats["learn/updates"] and stats["entropy"] < cfg.learn.collapse_entropy:
        problems.append(f"policy entropy {stats['entropy']:.3f} < learn.collapse_entropy")
    for p in problems:
        log.warning("partner %s gen %d round %d: %s", partner.name, state.generation, state.round, p)
        ctx.log.write(
            "warning", state.env_steps, partner=partner.name, generation=state.generation, round=state.round, message=p
        )


def assess(partner: Partner, label: str, state: LoopState, ctx: Context) -> list[EnvScore]:
    """Evaluates a policy on every env of the experiment and logs each score against the ceiling."""
    with ctx.timed("eval"):
        scores = evaluate(partner, list(ctx.suite.values()), ctx.cfg.eval, ctx.cfg.rollout, ctx.venvs)
    log_scores(scores, partner.envs, label, state, ctx)
    return scores


def assess_mixture(mixture: Mixture, state: LoopState, ctx: Context) -> list[EnvScore]:
    """Evaluates the mixture offspring (merge.fallback=mixture or cluster: each env routed to the member best on
    it) and logs it as the offspring; `save_generation` writes it as a mixture directory of its members."""
    params = route_params([m.name for m in mixture.members], mixture.routing)
    suite = list(ctx.suite.values())
    records = evaluate_modes(mixture.members, suite, ["route"], ctx.cfg.eval, ctx.cfg.rollout, params)
    scores = [EnvScore(**{f: r[f] for f in EnvScore.__dataclass_fields__}) for r in records]
    log_scores(scores, list(mixture.routing), "offspring", state, ctx)
    return scores


def log_scores(scores: list[EnvScore], own_envs: list[str], label: str, state: LoopState, ctx: Context) -> None:
    for s in scores:
        ctx.log.write(
            "eval",
            state.env_steps,
            generation=state.generation,
            round=state.round,
            partner=label,
            env=s.env,
            policy=s.policy,
            own_env=s.env in own_envs,
            mean_return=s.mean_return,
            success=s.success,
            optimal=s.optimal,
            random=s.random,
            normalized=s.normalized,
            episodes=s.episodes,
            exact=s.exact,
            **{
                f"return/{s.policy}/{label}/{s.env}": s.mean_return,
                f"normalized/{s.policy}/{label}/{s.env}": s.normalized,
            },
        )


def log_dynamics(state: LoopState, ctx: Context) -> None:
    """Logs what the partners learned from whom: compatibility, weight drift, transfer, forgetting. The
    compatibility is kept in `ctx.compat`: after a generation's last round, the offspring decides on it."""
    now = main_scores(state.last_scores)
    fields = {**transfer(now, state.partners), **forgetting(state.score_history, now)}
    ctx.compat = None
    if len(state.partners) > 1:
        ctx.compat = measure(state.ancestor, state.partners, ctx.probe)
        fields.update(pair_metrics(ctx.compat))
    ctx.log.write("dynamics", state.env_steps, generation=state.generation, round=state.round, **fields)


def assess_integration(state: LoopState, ctx: Context) -> None:
    """Evaluates the pair acting as one policy under each configured integration mode."""
    icfg = ctx.cfg.integrate
    if not icfg.modes or len(state.partners) < 2:
        return
    params = ModeParams(icfg.average, icfg.threshold, icfg.top_k)
    for mode in icfg.modes:
        ctx.show(f"integrate ({mode})")
        for record in evaluate_modes(
            state.partners, list(ctx.suite.values()), [mode], ctx.cfg.eval, ctx.cfg.rollout, params
        ):
            ctx.log.write("integrate", state.env_steps, generation=state.generation, **record)


def breed(state: LoopState, ctx: Context) -> Offspring:
    """Returns the generation's offspring: merged (or searched), a copy of the best partner, or a mixture."""
    cfg = ctx.cfg
    suite = list(ctx.suite.values())
    scores = {p.name: headline(state.last_scores[p.name]) for p in state.partners}
    # validation and search episodes are disjoint from the reported evaluation's seeds
    validate_fn = return_scorer(suite, cfg.eval, cfg.rollout, cfg.eval.seed + 30_000)
    validate_by_env = env_scorer(suite, cfg.eval, cfg.rollout, cfg.eval.seed + 30_000)  # routes merge.fallback=cluster
    search_fn = return_scorer(suite, cfg.eval, cfg.rollout, cfg.eval.seed + 20_000)
    # the last round's measurement, unless the run resumed after it (the weights have not changed since)
    measured, ctx.compat = ctx.compat, None
    return make_offspring(
        state.ancestor,
        state.partners,
        scores,
        cfg.merge,
        evaluate_fn=validate_fn,
        search_fn=search_fn,
        probe=ctx.probe,
        measured=measured,
        env_scores=main_scores(state.last_scores),
        env_score_fn=validate_by_env,
    )


def record_lineage(state: LoopState, ctx: Context, offspring: Offspring, child: list[EnvScore]) -> None:
    """Appends the offspring's node to lineage.json (written aside, then renamed) and logs the merge gain."""
    g = state.generation
    recipe = offspring.recipe()
    parent_scores = {p.name: normalized_by_env(state.last_scores[p.name]) for p in state.partners}
    child_scores = normalized_by_env(child)
    gain = {env: v - max(ps[env] for ps in parent_scores.values()) for env, v in child_scores.items()}
    node = {
        "id": f"gen{g}/offspring",
        "generation": g,
        "parents": [f"gen{g}/{p.name}" for p in state.partners],
        "ancestor": f"gen{g}/ancestor",
        "recipe": recipe,
        "scores": child_scores,
        "parent_scores": parent_scores,
        "merge_gain": gain,
        "env_steps": state.env_steps,
        "deployed": deploys(child_scores, g, ctx.run_dir),
    }
    state.lineage.append(node)
    write_json_atomic(ctx.run_dir / "lineage.json", state.lineage)
    gate = dataclasses.asdict(offspring.gate) if offspring.gate is not None else {}
    lora = offspring.lora if isinstance(offspring, Merged) else {}
    numbers = {f"merge/compat/{k}": v for k, v in (offspring.compat or {}).items() if isinstance(v, float)}
    numbers |= {f"merge/gate/{k}": v for k, v in gate.items() if isinstance(v, float)}
    numbers |= {f"merge/lora/{k}": v for k, v in lora.items() if isinstance(v, float)}
    # merge.fallback=cluster: {cluster: merged | single | refused}, and where each env went
    clusters = {c["name"]: c["outcome"] for c in offspring.clusters} if isinstance(offspring, Clustered) else {}
    ctx.log.write(
        "merge",
        state.env_steps,
        generation=g,
        method=recipe["method"],
        outcome=recipe["outcome"],
        promoted=offspring.promoted,
        deployed=node["deployed"],
        **({"clusters": clusters, "routing": offspring.routing} if clusters else {}),
        recipe=recipe,
        **numbers,
        **{f"merge/gain/{env}": v for env, v in gain.items()},
        **{"merge/gain": mean_over_envs(gain)},
    )


def save_generation(state: LoopState, offspring: Offspring, ctx: Context) -> None:
    """Writes checkpoints/gen_NNNN/{partners, ancestor, offspring} as Hugging Face directories, atomically;
    a `Mixture` offspring as a mixture directory of the partners routed per env (`colearn.breeding.mixture`). The
    partners' optimizer state goes along only with loop.keep_generations > 0 (see `prune_generations`)."""
    final = ctx.run_dir / "checkpoints" / f"gen_{state.generation:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in [*state.partners, state.ancestor]:
        kept = p if ctx.cfg.loop.keep_generations > 0 else dataclasses.replace(p, optimizer=None)
        kept.save(tmp / p.name, home=final / p.name)
    child = offspring.partner
    if isinstance(offspring, Mixture):
        save_mixture(offspring.members, offspring.routing, tmp / child.name, home=final / child.name)
    else:
        child.save(tmp / child.name, home=final / child.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_generations(ctx.run_dir, ctx.cfg.loop.keep_generations)


def deploy(state: LoopState, ctx: Context) -> None:
    """Moves the run's `deployed.json` pointer to this generation's offspring when its lineage node says so."""
    node = state.lineage[-1]
    if not node["deployed"]:
        return
    write_json_atomic(
        ctx.run_dir / "deployed.json",
        {
            "generation": state.generation,
            "path": f"checkpoints/gen_{state.generation:04d}/offspring",
            "scores": node["scores"],
            "recipe": node["recipe"],
        },
    )


def next_generation(state: LoopState, offspring: Offspring, ctx: Context) -> None:
    """Makes the offspring the new ancestor and starts the partners from what `Offspring.next_partners` says (a
    merge's copies; after a copy of the best partner, a fallback or merging off, the partners as they are; after
    merge.fallback=cluster, each merged cluster's partners from its merge), each acting where the curriculum
    puts it next. `offspring.partner` is always one set of weights: for a mixture, its best member's copy."""
    state.partners = offspring.next_partners(state.partners)
    state.ancestor = offspring.partner.clone("ancestor")
    state.generation += 1
    state.round = 0
    for partner, spec in zip(state.partners, ctx.cfg.env.partners_at(state.generation)):
        partner.envs = list(spec.envs)
