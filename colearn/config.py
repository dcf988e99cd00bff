"""The config schema: dataclasses (registered in Hydra's ConfigStore by `colearn.cli.experiment`); values live in
conf/ YAML.

Every field is documented once, here, where it is declared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from colearn.errors import ColearnError

# The closed sets of names a field may take. Registries that live above config.py (colearn.merging.operators.METHODS,
# colearn.breeding.integrate.MODES) hold the same names; tests/test_configs.py checks that they agree.
DTYPES = ("float32", "bfloat16", "float16")
AUTOCASTS = ("none", "bfloat16")
DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")
ROLLOUT_MODES = ("auto", "constrained", "generate")
VECTORIZATIONS = ("sync", "async")
ADVANTAGES = ("gae", "return_to_go", "episode")
ADVANTAGE_NORMS = ("std", "mean_std", "none")
DISTILL_SOURCES = ("peer", "self", "both")
DISTILL_SELECTIONS = ("success", "top")
MERGE_OPERATORS = (
    "linear",
    "task_arithmetic",
    "slerp",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "della",
    "breadcrumbs",
    "model_stock",
)
MERGE_METHODS = (*MERGE_OPERATORS, "none", "evolve")  # none: keep the best partner; evolve: CMA-ES over an operator
COMPAT_METRICS = ("cka", "cosine")
FALLBACKS = ("best", "mixture", "cluster")
LORA_OFFSPRING = ("fold", "adapter")
INTEGRATE_MODES = ("route", "route_confidence", "ensemble", "check_and_control", "consultative")
ENSEMBLE_AVERAGES = ("probs", "logprobs")
BACKENDS = ("local", "ray")


def check_one_of(name: str, value: Any, choices: Iterable[str]) -> None:
    """Raises ColearnError unless `value` is one of `choices`; the one-line message names the field and lists
    the valid names."""
    choices = tuple(choices)
    if value not in choices:
        raise ColearnError(f"{name}: {value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    source: str = "tiny"  # "tiny": build a small Llama from the fields below; else a local Hugging Face model dir
    hidden_size: int = 64  # tiny model only
    intermediate_size: int = 128  # tiny model only
    num_layers: int = 2  # tiny model only
    num_heads: int = 4  # tiny model only
    max_positions: int = 512  # tiny model only: longest prompt + action in tokens
    prompt_template: str = "{obs}\nAction:"  # how an observation becomes a prompt
    action_prefix: str = " "  # put between the prompt and the action text
    lora_rank: int = 0  # 0 trains full weights; >0 wraps the model in a LoRA adapter of this rank (peft)
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = alpha / rank)
    # module names LoRA adapts; []: peft's default for the model type (q_proj, v_proj on Llama; c_attn on GPT-2)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dtype: str = "float32"  # torch dtype of the weights: one of DTYPES (a LoRA adapter stays float32: peft's default)
    autocast: str = "none"  # none | bfloat16: run every forward pass (acting, scoring, learning) under torch.autocast
    # to bfloat16 on the run's device while the weights, optimizer state and losses keep model.dtype (mixed precision)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass instead of
    # keeping them (transformers' activation checkpointing, non-reentrant): less memory, about a third more compute

    def __post_init__(self) -> None:
        if not self.source:  # a preset for a downloaded model leaves it empty: Hydra's ??? would keep "tiny"
            raise ColearnError("model.source is empty; this model preset needs model.source=/path/to/hf_model_dir")
        if self.lora_rank < 0:
            raise ColearnError(f"model.lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        if self.source == "tiny" and self.hidden_size % self.num_heads:
            raise ColearnError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        check_one_of("model.dtype", self.dtype, DTYPES)
        check_one_of("model.autocast", self.autocast, AUTOCASTS)
        if self.autocast != "none" and self.dtype == "float16":
            raise ColearnError(
                f"model.autocast={self.autocast} with model.dtype=float16 mixes two half types; use "
                "model.dtype=float32 (mixed precision) or model.dtype=bfloat16"
            )


def distinct_env_names(field_name: str, suite: list[EnvSpec]) -> list[str]:
    """Returns the suite's env names; raises ColearnError naming the field when two are the same."""
    names = [e.name for e in suite]
    if len(set(names)) != len(names):
        raise ColearnError(f"{field_name} has duplicate names {names}; give each env a distinct name")
    return names


@dataclass
class EnvSpec:
    id: str = "colearn/FrozenLake-v0"  # a registered gymnasium id (see envs.ENV_IDS)
    name: str = ""  # short label used in metrics and tables; defaults to the id without namespace
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to gymnasium.make

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.id.split("/")[-1].removesuffix("-v0")


@dataclass
class PartnerSpec:
    name: str = "A"  # partner label in metrics, checkpoints and the experience store
    envs: list[str] = field(default_factory=list)  # env names (EnvSpec.name) this partner acts in


@dataclass
class Stage:
    generation: int = 0  # first generation of this stage of the curriculum
    partners: list[PartnerSpec] = field(default_factory=list)  # who acts where from that generation on


@dataclass
class EnvConfig:
    suite: list[EnvSpec] = field(default_factory=lambda: [EnvSpec()])  # every env of the experiment; all are evaluated
    partners: list[PartnerSpec] = field(default_factory=lambda: [PartnerSpec("A", ["FrozenLake"])])  # who acts where
    schedule: list[Stage] = field(default_factory=list)  # a curriculum: later stages change where partners act

    def __post_init__(self) -> None:
        names = distinct_env_names("env.suite", self.suite)
        check_partners(self.partners, names, "env.partners")
        for i, stage in enumerate(self.schedule):
            check_partners(stage.partners, names, f"env.schedule[{i}].partners")
            if [p.name for p in stage.partners] != [p.name for p in self.partners]:
                raise ColearnError(f"env.schedule[{i}].partners must name the same partners as env.partners, in order")

    def partners_at(self, generation: int) -> list[PartnerSpec]:
        """Returns who acts where in `generation` (the latest schedule stage that has started)."""
        current = self.partners
        for stage in sorted(self.schedule, key=lambda s: s.generation):
            if stage.generation <= generation:
                current = stage.partners
        return current


def check_partners(partners: list[PartnerSpec], names: list[str], field_name: str) -> None:
    """Raises ColearnError unless every partner acts in at least one known env and names are distinct."""
    for p in partners:
        if not p.envs:
            raise ColearnError(f"{field_name}[{p.name}].envs is empty; list the env names it acts in")
        for n in p.envs:
            if n not in names:
                raise ColearnError(f"{field_name}[{p.name}].envs names {n!r}, which is not in env.suite {names}")
    if len({p.name for p in partners}) != len(partners):
        raise ColearnError(f"{field_name} have duplicate names; give each partner a distinct name")


@dataclass
class RolloutConfig:
    episodes: int = 64  # episodes each partner plays per env per round
    group_size: int = 8  # episodes sharing one reset seed (a group for group-relative advantages)
    num_envs: int = 32  # parallel sub-environments of the vector env (one batched forward pass per step)
    mode: str = "auto"  # constrained | generate | auto (constrained where the env has action names)
    temperature: float = 1.0  # sampling temperature of the behaviour policy
    max_new_tokens: int = 8  # generate mode: longest action
    gamma: float = 1.0  # discount of the return_to_go stored in each step record and of GAE (learn.advantage=gae)
    vectorization: str = "sync"  # sync | async (gymnasium vector env)

    def __post_init__(self) -> None:
        check_one_of("rollout.mode", self.mode, ROLLOUT_MODES)
        check_one_of("rollout.vectorization", self.vectorization, VECTORIZATIONS)
        if self.episodes < 1 or self.group_size < 1 or self.num_envs < 1:
            raise ColearnError("rollout.episodes, rollout.group_size and rollout.num_envs must be >= 1")
        if self.episodes % self.group_size:
            raise ColearnError(
                f"rollout.episodes={self.episodes} is not a multiple of rollout.group_size={self.group_size}"
            )
        if not self.temperature > 0:
            raise ColearnError(f"rollout.temperature={self.temperature} must be > 0")
        if self.max_new_tokens < 1:
            raise ColearnError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.gamma <= 1:
            raise ColearnError(f"rollout.gamma={self.gamma} must be in [0, 1]")


@dataclass
class LearnConfig:
    lr: float = 5e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 4096  # step records per gradient step (those sharing state, action and advantage sign
    # run once, so one batch of a whole round is cheap on envs that repeat states)
    micro_batch_size: int = 0  # gradient accumulation: a gradient step's batch (once its repeated steps are merged)
    # goes through the model this many records at a time, its gradients summed before the one optimizer step; every
    # loss term keeps the whole batch's normalization, so the step is the unaccumulated one up to float error. Bounds
    # activation memory on a GPU; 0 passes the whole batch at once
    epochs: int = 40  # passes over a round's data
    max_grad_norm: float = 1.0  # gradient clipping
    rl_coef: float = 1.0  # weight of the policy-gradient loss on own steps (0 disables RL)
    peer_rl_coef: float = 0.5  # weight of the importance-weighted policy-gradient loss on the partner's steps
    peer_ratio_cap: float = 1.0  # truncation of the importance ratio pi_self / pi_partner on partner steps (SEAC)
    clip_eps: float = 0.2  # PPO clip of the ratio against the behaviour log-probability
    target_kl: float = 0.05  # end the round's updates once the estimated KL(behaviour || policy) on own steps
    # exceeds this (checked before each step, as in Stable-Baselines3's PPO); 0 never stops early
    entropy_coef: float = 0.02  # entropy bonus
    advantage: str = "gae"  # gae (value head + GAE) | return_to_go (per-observation Monte-Carlo baseline) |
    # episode (group-normalized episode return: GRPO)
    gae_lambda: float = 0.95  # GAE's lambda: 0 bootstraps from the next state's value, 1 is the Monte-Carlo return
    value_coef: float = 0.5  # weight of the value head's squared error (advantage=gae)
    advantage_norm: str = "std"  # advantage=gae, per kind and round: std (divide by the std, keeping each sign) |
    # mean_std (also subtract the mean, as PPO implementations do) | none
    advantage_floor: float = 0.0  # advantage=gae: advantage_norm divides by the advantages' std or this, whichever
    # is larger: a round whose advantages are only the value head's noise (no step's return differs) stays small
    distill_coef: float = 0.1  # weight of distillation (SFT on selected successes); 0 disables it
    distill_from: str = "peer"  # peer | self | both: whose successes to imitate
    distill_select: str = "success"  # success (episodes that reached the goal) | top (top fraction by return)
    distill_top_fraction: float = 0.25  # with distill_select=top
    distill_random_envs: bool = False  # also imitate episodes of envs whose transitions are random (slippery maps):
    # a success there is partly luck, and imitating it teaches the luck (docs/learning.md)
    mutual_kl_coef: float = 0.0  # KL(peer || self) on the peers' states, averaged over the peers (deep mutual
    # learning); 0 disables
    collapse_entropy: float = 0.05  # warn when mean policy entropy falls below this (nats)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ColearnError(f"learn.lr={self.lr} must be a positive finite number (try 1e-3)")
        if self.batch_size < 1 or self.epochs < 0:
            raise ColearnError(f"learn.batch_size={self.batch_size} must be >= 1 and learn.epochs >= 0")
        if self.micro_batch_size < 0:
            raise ColearnError(
                f"learn.micro_batch_size={self.micro_batch_size} must be >= 0 (0: the whole batch in one pass)"
            )
        check_one_of("learn.advantage", self.advantage, ADVANTAGES)
        check_one_of("learn.advantage_norm", self.advantage_norm, ADVANTAGE_NORMS)
        check_one_of("learn.distill_from", self.distill_from, DISTILL_SOURCES)
        check_one_of("learn.distill_select", self.distill_select, DISTILL_SELECTIONS)
        if not (self.advantage_floor >= 0 and math.isfinite(self.advantage_floor)):
            raise ColearnError(
                f"learn.advantage_floor={self.advantage_floor} must be >= 0 (0: divide by the std alone)"
            )
        if not 0 <= self.gae_lambda <= 1:
            raise ColearnError(f"learn.gae_lambda={self.gae_lambda} must be in [0, 1]")
        if not 0 < self.distill_top_fraction <= 1:
            raise ColearnError(f"learn.distill_top_fraction={self.distill_top_fraction} must be in (0, 1]")
        if self.max_grad_norm <= 0 or self.clip_eps <= 0 or self.peer_ratio_cap <= 0:
            raise ColearnError("learn.max_grad_norm, learn.clip_eps and learn.peer_ratio_cap must be > 0")


@dataclass
class MergeConfig:
    method: str = "linear"  # one of MERGE_METHODS: an operator, "none" (keep the best partner) or "evolve" (CMA-ES)
    weights: list[float] = field(default_factory=list)  # per partner; empty means equal weights
    density: float = 1.0  # fraction of each task vector kept (TIES/DARE/DELLA/breadcrumbs/magnitude_prune)
    to_ancestor: float = 0.0  # 0 keeps the merge, 1 returns the ancestor (WARP's interpolation toward init)
    params: dict[str, Any] = field(default_factory=dict)  # extra method parameters (e.g. gamma, epsilon)
    groups: dict[str, Any] = field(default_factory=dict)  # per layer group overrides,
    # e.g. {"block*.mlp": {density: 0.5}}
    seed: int = 0  # seed of random operators (DARE, DELLA), of the CMA-ES search and of a folded LoRA offspring's
    # fresh adapter
    base_method: str = "ties"  # method=evolve: the operator (one of MERGE_OPERATORS) whose per-group weights
    # (and density) CMA-ES searches
    search_budget: int = 24  # method=evolve: candidates scored on the search episodes (the uniform one included)
    search_sigma: float = 0.5  # method=evolve: CMA-ES initial step size, in logit units of the squashed parameters
    search_max_weight: float = 1.5  # method=evolve: searched weights lie in [0, this]; densities in [0.05, 1]
    compat_metric: str = "cka"  # cka | cosine: the compatibility measure compared to compat_threshold
    compat_threshold: float = 0.0  # below it the partners are not averaged but fall back; 0 never falls back
    fallback: str = "best"  # best | mixture | cluster: offspring if incompatible or gated out (mixture: the partners
    # routed per env, saved as a mixture directory, see colearn.breeding.mixture; cluster: the partners grouped by
    # compatibility, every pair of a group >= compat_threshold, each group merged and the groups routed per env,
    # see colearn.breeding.clusters)
    gate: bool = True  # promote the offspring only if its validation score >= best parent's - gate_tolerance
    gate_tolerance: float = 0.05  # mean normalized return the offspring may lose against the best parent
    lora_offspring: str = "fold"  # LoRA partners: "fold" the merged change into the base under a fresh adapter,
    # or keep it as an "adapter" on the unchanged base (truncated SVD to the partners' rank, error logged)

    def __post_init__(self) -> None:
        check_one_of("merge.method", self.method, MERGE_METHODS)
        check_one_of("merge.base_method", self.base_method, MERGE_OPERATORS)
        check_one_of("merge.compat_metric", self.compat_metric, COMPAT_METRICS)
        check_one_of("merge.fallback", self.fallback, FALLBACKS)
        check_one_of("merge.lora_offspring", self.lora_offspring, LORA_OFFSPRING)
        if not 0 < self.density <= 1:
            raise ColearnError(f"merge.density={self.density} must be in (0, 1]")
        if not 0 <= self.to_ancestor <= 1:
            raise ColearnError(f"merge.to_ancestor={self.to_ancestor} must be in [0, 1]")
        if self.search_budget < 1 or not self.search_sigma > 0 or not self.search_max_weight > 0:
            raise ColearnError("merge.search_budget must be >= 1, merge.search_sigma and merge.search_max_weight > 0")
        if not self.gate_tolerance >= 0:
            raise ColearnError(f"merge.gate_tolerance={self.gate_tolerance} must be >= 0")


@dataclass
class LoopConfig:
    generations: int = 2  # generations (each ends in a merge)
    rounds: int = 3  # rounds per generation (each: act, learn, evaluate)
    exchange: bool = True  # partners see each other's experience (off: independent partners)
    keep_generations: int = 0  # generation checkpoints kept (newest, plus the deployed one); 0 keeps all
    # (the partners' optimizer state only in the kept newest: none at 0; round checkpoints always have it)

    def __post_init__(self) -> None:
        if self.generations < 1 or self.rounds < 1:
            raise ColearnError(f"loop.generations={self.generations} and loop.rounds={self.rounds} must be >= 1")


@dataclass
class EvalConfig:
    episodes: int = 32  # evaluation episodes per env and policy
    greedy: bool = True  # evaluate the greedy (argmax) policy
    sampled: bool = False  # also evaluate the sampled policy (at rollout.temperature)
    seed: int = 10_000  # evaluation seeds start here (disjoint from training seeds)
    exact: bool = True  # where the env has a transition table (FrozenLake, Taxi), score a policy (a partner, an
    # integration mode, a mixture) by its exact expected return (dynamic programming over the table, no sampling
    # noise) instead of eval.episodes episodes

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ColearnError(f"eval.episodes={self.episodes} must be >= 1")
        if not (self.greedy or self.sampled):
            raise ColearnError("eval.greedy and eval.sampled are both false; evaluate at least one policy")


@dataclass
class PretrainConfig:
    suite: list[EnvSpec] = field(default_factory=list)  # envs the ancestor learns alone before generation 0, in a run
    # of its own (RUN_DIR/pretrain, resumable like any run): the partners then start as fine-tunes of one trained base,
    # which is where weight averaging is known to work. Their text joins the tiny tokenizer's even with rounds 0
    rounds: int = 0  # rounds of that pretraining (rollout.episodes episodes per env each, the run's learner); 0: none

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ColearnError(f"pretrain.rounds={self.rounds} must be >= 0 (0: no pretraining)")
        if self.rounds and not self.suite:
            raise ColearnError(
                f"pretrain.rounds={self.rounds} needs pretrain.suite (the envs to pretrain on), e.g. "
                "pretrain=four_lakes"
            )
        distinct_env_names("pretrain.suite", self.suite)


@dataclass
class IntegrateConfig:
    modes: list[str] = field(default_factory=list)  # integration modes (INTEGRATE_MODES) evaluated each generation
    average: str = "probs"  # ensemble: average "probs" or "logprobs" (renormalized product of experts)
    threshold: float = 0.1  # check_and_control: the checker vetoes proposals it gives less probability than this
    top_k: int = 2  # consultative: legal actions the proposer offers the chooser

    def __post_init__(self) -> None:
        for mode in self.modes:
            check_one_of("integrate.modes", mode, INTEGRATE_MODES)
        check_one_of("integrate.average", self.average, ENSEMBLE_AVERAGES)


@dataclass
class RayConfig:
    address: str = ""  # "": start a local Ray for the run (and stop it at the end); "auto": attach to the cluster
    # `ray start` runs on this machine; "host:port" (or "ray://host:port"): attach to that cluster's head
    num_cpus: float = 1.0  # CPUs each partner's actor reserves; a local Ray gets at least partners x this many
    num_gpus: float = 0.0  # GPUs each partner's actor reserves; > 0 puts the partner on its GPU (needs device=cuda
    # or auto, where the loop keeps its copies, merges and evaluates the offspring); 0.5: two partners a GPU
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Ray's runtime_env of the run's actors, e.g.
    # {py_modules: [/path/colearn, /path/envs]} where the cluster's nodes lack colearn (docs/scale.md)

    def __post_init__(self) -> None:
        if not (self.num_cpus >= 0 and self.num_gpus >= 0):
            raise ColearnError(f"ray.num_cpus={self.num_cpus} and ray.num_gpus={self.num_gpus} must be >= 0")


@dataclass
class Config:
    seed: int = 0  # master seed: model init, sampling, env resets
    device: str = "cpu"  # one of DEVICES: cpu | cuda | cuda:N | mps | auto (cuda, then mps, when available)
    threads: int = 1  # torch intra-op threads of this run (1: N runs share N cores without oversubscribing);
    # 0 keeps torch's default, one per core
    run_id: str = ""  # label of the run in step records; defaults to the run directory name
    backend: str = "local"  # one of BACKENDS: where partners act, learn and are evaluated: local (in this process,
    # one after another) | ray (one Ray actor per partner, in parallel; see `ray`, docs/scale.md)
    ray: RayConfig = field(default_factory=RayConfig)  # backend=ray: the cluster and each actor's resources
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    integrate: IntegrateConfig = field(default_factory=IntegrateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # an ancestor trained before generation 0
    probe_size: int = 16  # observations per env in the fixed probe set for CKA between partners
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", self.device):
            raise ColearnError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.threads < 0:
            raise ColearnError(f"threads={self.threads} must be >= 0 (0: torch's default, one per core)")
        check_one_of("backend", self.backend, BACKENDS)
        if self.backend == "ray" and self.device.startswith("cuda") and not self.ray.num_gpus:
            raise ColearnError(
                f"device={self.device} with backend=ray gives the actors no GPU; set ray.num_gpus "
                "(1 per partner, or 0.5 to share one GPU between two)"
            )
        if self.backend == "ray" and self.ray.num_gpus and not self.device.startswith(("cuda", "auto")):
            raise ColearnError(f"ray.num_gpus={self.ray.num_gpus} needs device=cuda or auto (it is {self.device})")


def pretraining_config(cfg: Config) -> Config:
    """Returns the config of `cfg`'s pretraining run: one partner acting alone on every env of pretrain.suite for
    pretrain.rounds rounds (one generation, no merge, no integration modes), with the run's model, learner, rollout,
    evaluation and seed. Its own pretrain field holds env.suite at 0 rounds, so its tokenizer covers both suites."""
    names = [e.name for e in cfg.pretrain.suite]
    return replace(
        cfg,
        backend="local",
        env=EnvConfig(suite=list(cfg.pretrain.suite), partners=[PartnerSpec("A", names)]),
        merge=replace(cfg.merge, method="none"),
        loop=replace(cfg.loop, generations=1, rounds=cfg.pretrain.rounds, exchange=False),
        integrate=replace(cfg.integrate, modes=[]),
        pretrain=PretrainConfig(suite=list(cfg.env.suite), rounds=0),
    )
