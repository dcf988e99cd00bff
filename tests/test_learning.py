"""Learning by experience: hand-checked advantages and losses, a seeded learning run, distillation transfer,
NaN safety, and lineage across generations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from colearn import loop
from colearn.config import (
    Config,
    EnvConfig,
    EnvSpec,
    EvalConfig,
    LearnConfig,
    LoopConfig,
    MergeConfig,
    PartnerSpec,
    RolloutConfig,
)
from colearn.experience.evaluate import evaluate
from colearn.experience.rollout import EpisodeMeta, collect
from colearn.learning.learn import (
    Item,
    approx_kl,
    batch_loss,
    clipped_pg_loss,
    gae,
    gae_advantages,
    group_advantages,
    learn,
    merged,
    normalized,
    peer_pg_loss,
    select_for_distillation,
    step_advantages,
    value_head_for,
)
from colearn.models.build import build_ancestor
from colearn.models.partner import Partner
from tests.conftest import LAKE_ID, tiny_model_config

SMALL_LAKE = EnvSpec(LAKE_ID, name="Small", kwargs={"desc": ["SFF", "FHF", "HFG"]})


def small_lake_episodes(partner: Partner, episodes: int) -> list[dict]:
    """Returns the step records of `episodes` episodes the partner plays on SMALL_LAKE (seeds 0..episodes-1)."""
    config = RolloutConfig(episodes=episodes, group_size=1, num_envs=episodes)
    meta = EpisodeMeta(partner="A")
    return collect(partner, SMALL_LAKE, list(range(episodes)), config, torch.Generator().manual_seed(0), meta)


@pytest.fixture
def partner_factory():
    """Builds a fresh tiny partner (weights seeded) whose tokenizer knows the lake's text."""
    texts, names = loop.env_corpus([SMALL_LAKE])

    def build(seed: int) -> Partner:
        model, tokenizer = build_ancestor(tiny_model_config(), texts, names, seed=seed)
        return Partner(f"p{seed}", model.eval(), tokenizer, tiny_model_config())

    return build


def rows_of(episodes: list[list[float]], seeds: list[int], gamma: float = 1.0) -> list[dict]:
    """Step records with the fields the advantage functions read, one list of rewards per episode."""
    rows = []
    for e, (rewards, seed) in enumerate(zip(episodes, seeds)):
        g, rtg = 0.0, []
        for r in reversed(rewards):
            g = r + gamma * g
            rtg.insert(0, g)
        for t in range(len(rewards)):
            rows.append(
                {
                    "partner": "A",
                    "env": "E",
                    "generation": 0,
                    "round": 0,
                    "seed": seed,
                    "step": t,
                    "episode_id": f"e{e}",
                    "return_to_go": rtg[t],
                    "observation": f"s{t}",
                    "success": rewards[-1] > 0,
                    "invalid": False,
                    "episode_return": sum(rewards),
                }
            )
    return rows


def test_group_advantages_match_hand_computation():
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0], dtype=torch.float64)
    adv = group_advantages(returns, ["a", "a", "b", "b", "c", "c"])
    # group a: mean 0.5, sample std 0.7071 -> +/-0.7071; group c has no variance -> 0
    assert adv[:4].tolist() == pytest.approx([0.70710, -0.70710, -0.70710, 0.70710], abs=1e-4)
    assert adv[4:].tolist() == [0.0, 0.0]


def test_episode_advantages_are_shared_by_every_step_of_the_episode():
    rows = rows_of([[0, 1], [0, 0, 0]], seeds=[7, 7])
    adv = step_advantages(rows, "episode")
    assert adv == pytest.approx([0.70710, 0.70710, -0.70710, -0.70710, -0.70710], abs=1e-4)


def test_return_to_go_advantages_use_a_per_state_baseline():
    # both episodes visit s0 then s1; only the first is rewarded at s1
    rows = rows_of([[0, 1], [0, 0]], seeds=[1, 2], gamma=0.5)
    adv = step_advantages(rows, "return_to_go")
    # returns-to-go: e0 (0.5, 1), e1 (0, 0); baselines s0 = 0.25, s1 = 0.5 -> raw (0.25, 0.5, -0.25, -0.5)
    raw = torch.tensor([0.25, 0.5, -0.25, -0.5], dtype=torch.float64)
    assert adv == pytest.approx((raw / raw.std()).tolist(), abs=1e-6)


def test_gae_matches_hand_computation():
    rewards, values = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.2, 0.4])
    adv, targets = gae(rewards, values, gamma=0.9, lam=0.8)
    # TD errors: 0 + 0.9 * 0.2 - 0.5 = -0.32, 0 + 0.9 * 0.4 - 0.2 = 0.16, 1 + 0 - 0.4 = 0.6 (the end has value 0)
    # advantages backwards with gamma * lam = 0.72: 0.6, 0.16 + 0.72 * 0.6, -0.32 + 0.72 * 0.592
    assert adv.tolist() == pytest.approx([0.10624, 0.592, 0.6], abs=1e-6)
    assert targets.tolist() == pytest.approx([0.60624, 0.792, 1.0], abs=1e-6)


def test_gae_restarts_at_each_episode_and_normalizes():
    rows = rows_of([[0, 1], [0, 0, 0]], seeds=[1, 2])
    for r, reward in zip(rows, [0, 1, 0, 0, 0]):
        r["reward"] = reward
    adv, targets = gae_advantages(rows, torch.zeros(5), gamma=1.0, lam=1.0)
    assert adv.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # nothing of episode e0's reward leaks into e1
    assert targets.tolist() == adv.tolist()
    scaled = normalized(adv, "mean_std")
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-9) and scaled.std().item() == pytest.approx(1.0)
    divided = normalized(adv, "std")  # std of (1, 1, 0, 0, 0) is sqrt(0.3): signs and zeros kept
    assert divided.tolist() == pytest.approx([1 / math.sqrt(0.3)] * 2 + [0.0] * 3)
    assert normalized(adv, "none") is adv
    noise = adv / 100  # std sqrt(0.3) / 100 < 0.1: divided by the floor, not scaled up to the size of real advantages
    assert normalized(noise, "std", floor=0.1).tolist() == pytest.approx((noise / 0.1).tolist())
    assert normalized(adv, "std", floor=0.1).tolist() == pytest.approx(divided.tolist())  # std above the floor
    assert normalized(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # nothing to scale: left as it is


def test_approx_kl_matches_hand_computation():
    logp, behaviour = torch.tensor([math.log(0.5), math.log(0.2), 0.0]), torch.tensor([math.log(0.25)] * 3)
    # r = 2 and 0.8 on the two own rows: (r - 1) - log r = 1 - log 2 and -0.2 - log 0.8; the third row is masked
    expected = ((1 - math.log(2)) + (-0.2 - math.log(0.8))) / 2
    assert approx_kl(logp, behaviour, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(expected, abs=1e-6)
    assert approx_kl(logp, behaviour, torch.tensor([0.0] * 3)).item() == 0.0
    weighted = (3 * (1 - math.log(2)) + (-0.2 - math.log(0.8))) / 4  # a row standing for 3 steps counts 3 times
    assert approx_kl(logp, behaviour, torch.tensor([3.0, 1.0, 0.0])).item() == pytest.approx(weighted, abs=1e-6)


def test_clipped_and_peer_losses_match_hand_computation():
    logp = torch.tensor([math.log(0.6), math.log(0.6)], requires_grad=True)
    behaviour = torch.tensor([math.log(0.4), math.log(0.4)])
    adv = torch.tensor([1.0, -1.0])
    # ratio 1.5: positive advantage is clipped at 1.2, negative keeps the unclipped 1.5
    assert clipped_pg_loss(logp, behaviour, adv, 0.2).tolist() == pytest.approx([-1.2, 1.5], abs=1e-6)
    # SEAC: weight min(0.6 / 0.4, cap) held constant, times advantage times log-prob
    peer = peer_pg_loss(logp, behaviour, adv, cap=1.0)
    assert peer.tolist() == pytest.approx([-math.log(0.6), math.log(0.6)], abs=1e-6)
    peer[0].backward()
    assert logp.grad[0].item() == pytest.approx(-1.0)  # d/dlogp of -(1.0 * 1.0 * logp)


def test_selection_keeps_successes_or_the_top_fraction():
    rows = rows_of([[0, 1], [0, 0], [0, 0, 0]], seeds=[1, 1, 1])
    assert {r["episode_id"] for r in select_for_distillation(rows, "success", 0.5)} == {"e0"}
    assert {r["episode_id"] for r in select_for_distillation(rows, "top", 1 / 3)} == {"e0"}


def test_distillation_imitates_successful_paths_without_their_loops():
    rows = rows_of([[0, 0, 0, 0, 1], [0, 0]], seeds=[1, 1])
    for r, obs in zip(rows, ["A", "B", "A", "C", "D", "A", "B"]):  # episode e0 goes A B A C D: A-B-A is a loop
        r["observation"] = obs
    kept = select_for_distillation(rows, "success", 1.0)
    assert [(r["episode_id"], r["observation"], r["step"]) for r in kept] == [
        ("e0", "A", 2),
        ("e0", "C", 3),
        ("e0", "D", 4),
    ]


def small_config(seed: int, generations: int, rounds: int, **learn) -> Config:
    return Config(
        seed=seed,
        model=tiny_model_config(),
        env=EnvConfig(suite=[SMALL_LAKE], partners=[PartnerSpec("A", ["Small"]), PartnerSpec("B", ["Small"])]),
        rollout=RolloutConfig(episodes=64, group_size=8, num_envs=64, gamma=0.95),
        learn=LearnConfig(
            **{
                "lr": 3e-3,
                "batch_size": 128,
                "epochs": 4,
                "advantage": "return_to_go",
                "distill_from": "both",
                "peer_rl_coef": 1.0,
                "distill_coef": 1.0,
                "entropy_coef": 0.01,
                **learn,
            }
        ),
        loop=LoopConfig(generations=generations, rounds=rounds),
        eval=EvalConfig(episodes=8, sampled=True),
        progress=False,
    )


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("learned")
    state = loop.run(small_config(seed=0, generations=4, rounds=2), run_dir)
    return state, run_dir


def test_full_system_goes_from_chance_to_optimal(learned_run):
    state, _ = learned_run
    chance = {s.policy: s.normalized for s in state.last_scores["ancestor"]}
    final = {s.policy: s.normalized for s in state.last_scores["offspring"]}
    assert chance["greedy"] < 0.5 and chance["sampled"] < 0.5
    assert final["greedy"] >= 0.9 and final["sampled"] >= 0.9


def test_lineage_and_metrics_follow_the_generations(learned_run):
    state, run_dir = learned_run
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert [n["generation"] for n in lineage] == [0, 1, 2, 3]
    assert all(n["parents"] == [f"gen{n['generation']}/A", f"gen{n['generation']}/B"] for n in lineage)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    merges = [e for e in events if e["event"] == "merge"]
    assert [e["generation"] for e in merges] == [0, 1, 2, 3]
    steps = [e["step"] for e in events if e["event"] == "eval"]
    assert steps == sorted(steps) and steps[-1] == state.env_steps
    assert (run_dir / "deployed.json").is_file()


def test_distillation_alone_transfers_a_skill(learned_run, partner_factory):
    """A fresh student that never acts in the env learns it from a skilled partner's successful episodes."""
    teacher, student = learned_run[0].partners[0], partner_factory(seed=2)
    spec, rollout = SMALL_LAKE, RolloutConfig(episodes=64, group_size=8, num_envs=64)
    rows = collect(
        teacher, spec, list(range(64)), rollout, torch.Generator().manual_seed(0), EpisodeMeta(partner="teacher")
    )
    successes = select_for_distillation(rows, "success", 1.0)
    assert successes, "the trained teacher should succeed on the 3x3 lake"
    ev = EvalConfig(episodes=64, greedy=False, sampled=True)
    before = evaluate(student, [spec], ev, rollout)[0].success
    cfg = LearnConfig(lr=3e-3, batch_size=64, epochs=30, rl_coef=0.0, peer_rl_coef=0.0)
    learn(student, own=[], peer=[], distill=successes, cfg=cfg, seed=0)
    after = evaluate(student, [spec], ev, rollout)[0].success
    assert after >= before + 0.3, (before, after)


def test_the_partners_steps_alone_transfer_a_skill(learned_run, partner_factory):
    """With distillation off, a student that never acts in the env improves there from a partner's steps,
    weighted by min(pi_student / pi_partner, cap): the shared-experience policy gradient (SEAC)."""
    teacher, student = learned_run[0].partners[0], partner_factory(seed=2)
    spec = SMALL_LAKE
    # the partner explores at a high temperature, so its episodes both succeed and fail
    rollout = RolloutConfig(episodes=256, group_size=8, num_envs=64, temperature=6.0)
    rows = collect(
        teacher, spec, list(range(256)), rollout, torch.Generator().manual_seed(0), EpisodeMeta(partner="teacher")
    )
    outcomes = {r["episode_id"]: r["success"] for r in rows}
    assert 0.1 < sum(outcomes.values()) / len(outcomes) < 0.9, sum(outcomes.values()) / len(outcomes)
    ev = EvalConfig(episodes=64, greedy=True, sampled=True)
    before = {s.policy: s.success for s in evaluate(student, [spec], ev, RolloutConfig())}
    # (learn.advantage_norm=mean_std fails here: centred, this partner's many successes turn its few failures
    # into large negative advantages on states the fresh student cannot yet tell apart, and it collapses)
    cfg = LearnConfig(lr=3e-3, batch_size=4096, epochs=30, rl_coef=0.0, peer_rl_coef=1.0, distill_coef=0.0)
    stats = learn(student, own=[], peer=rows, distill=[], cfg=cfg, seed=0, temperature=1.0, gamma=0.99)
    assert stats["learn/distill_rows"] == 0 and stats["learn/updates"] == 30
    after = {s.policy: s.success for s in evaluate(student, [spec], ev, RolloutConfig())}
    assert after["sampled"] >= before["sampled"] + 0.2 and after["greedy"] == 1.0, (before, after)


def test_merged_items_give_the_loss_and_gradient_of_their_steps(partner_factory):
    """Steps that share kind, prompt, action, behaviour log-prob and advantage sign train as one item: the loss
    and every gradient are those of the steps one by one."""
    partner = partner_factory(seed=4)
    rows = collect(
        partner,
        SMALL_LAKE,
        list(range(32)),
        RolloutConfig(episodes=32, group_size=4, num_envs=32),
        torch.Generator().manual_seed(0),
        EpisodeMeta(partner="A"),
    )
    gen = torch.Generator().manual_seed(1)
    adv, targets = torch.randn(2, len(rows), generator=gen).tolist()
    steps = [Item(kind, r, a, t) for kind in ("own", "peer") for r, a, t in zip(rows, adv, targets)]
    steps += [Item("distill", r, 0.0) for r in rows[:20]]
    items = merged(steps)
    assert len(items) < len(steps) / 3 and sum(it.count for it in items) == len(steps)
    # merging what was merged in two halves gives the same items as merging once
    half = len(steps) // 2
    twice = {
        (it.kind, tuple(it.row["prompt_ids"]), it.row["action"], it.adv > 0): it
        for it in merged(merged(steps[:half]) + merged(steps[half:]))
    }
    for it in items:
        again = twice[(it.kind, tuple(it.row["prompt_ids"]), it.row["action"], it.adv > 0)]
        assert again.count == it.count
        assert (again.adv, again.target, again.spread) == pytest.approx((it.adv, it.target, it.spread), abs=1e-9)
    cfg = LearnConfig(advantage="gae", distill_coef=0.5, entropy_coef=0.1, value_coef=0.5)
    value_head_for(partner)

    def loss_and_grads(batch):
        partner.model.zero_grad()
        partner.value_head.zero_grad()
        loss, parts = batch_loss(partner, batch, cfg)
        loss.backward()
        params = [*partner.model.parameters(), *partner.value_head.parameters()]
        return loss.item(), parts, [p.grad.clone() for p in params if p.grad is not None]

    loss, parts, grads = loss_and_grads(steps)
    loss_merged, parts_merged, grads_merged = loss_and_grads(items)
    assert loss_merged == pytest.approx(loss, abs=1e-5)
    assert parts_merged == pytest.approx(parts, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads_merged))


def test_target_kl_ends_the_round_once_the_policy_has_moved_that_far(partner_factory):
    """learn.target_kl is checked before each step: the first step starts at the behaviour policy (KL 0) and always
    runs; the round ends at the first check above the target, and without a target every epoch runs."""
    rows = small_lake_episodes(partner_factory(seed=3), 16)
    for r in rows:  # a signal to follow: the first half of the episodes succeed
        r["return_to_go"] = r["reward"] = float(r["episode_id"] < rows[len(rows) // 2]["episode_id"])
    cfg = dict(epochs=6, lr=1e-2, advantage="return_to_go")
    free = learn(partner_factory(seed=3), rows, [], [], LearnConfig(target_kl=0.0, **cfg), seed=0)
    assert free["learn/updates"] == 6 and "learn/stopped_at_kl" not in free
    tight = learn(partner_factory(seed=3), rows, [], [], LearnConfig(target_kl=1e-9, **cfg), seed=0)
    assert tight["learn/updates"] == 1 and tight["learn/stopped_at_kl"] > 1e-9


def test_non_finite_loss_skips_the_update_and_keeps_weights(partner_factory):
    partner = partner_factory(seed=3)
    rows = small_lake_episodes(partner, 8)
    for r in rows:
        r["success"] = True
    with torch.no_grad():
        next(partner.model.parameters()).fill_(float("nan"))
    before = {k: v.clone() for k, v in partner.model.state_dict().items()}
    stats = learn(partner, own=[], peer=[], distill=rows, cfg=LearnConfig(), seed=0)
    assert stats["learn/skipped_nonfinite"] >= 1 and stats["learn/updates"] == 0
    after = partner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_a_round_without_successes_skips_distillation_and_says_so(tmp_path):
    # the ancestor acting for one round on a large lake essentially never reaches the goal
    cfg = small_config(seed=0, generations=1, rounds=1)
    cfg.env = EnvConfig(suite=[EnvSpec("colearn/FrozenLake8x8-v0", "Big")], partners=[PartnerSpec("A", ["Big"])])
    cfg.rollout = RolloutConfig(episodes=8, group_size=8, num_envs=8)
    cfg.eval = EvalConfig(episodes=1)
    loop.run(cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "distill_skipped"]
    assert skipped and "no success episodes" in skipped[0]["reason"]


def test_incompatible_partners_fall_back_to_a_routed_mixture(tmp_path):
    cfg = small_config(seed=0, generations=1, rounds=1)
    cfg.merge = MergeConfig(compat_metric="cosine", compat_threshold=0.99, fallback="mixture")
    cfg.env = EnvConfig(
        suite=[SMALL_LAKE, EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]})],
        partners=[PartnerSpec("A", ["Small"]), PartnerSpec("B", ["Line"])],
    )
    loop.run(cfg, tmp_path)
    node = json.loads((tmp_path / "lineage.json").read_text())[0]
    assert node["recipe"]["outcome"] == "fallback" and "cosine" in node["recipe"]["reason"]
    assert set(node["recipe"]["mixture"]) == {"Small", "Line"}
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    routed = [e for e in events if e["event"] == "eval" and e["partner"] == "offspring"]
    assert {e["env"] for e in routed} == {"Small", "Line"}


def test_two_specialists_sharing_and_merging_give_one_generalist(tmp_path):
    """Q2 in small: A acts only on a line whose goal is on the right, B only on its mirror; after one generation
    of sharing and a merge the offspring solves both lines, while without sharing or merging (`independent`)
    the best partner, which is what that preset keeps, solves at most its own."""
    line = EnvSpec(LAKE_ID, name="Line", kwargs={"desc": ["SFFG"]})
    mirror = EnvSpec(LAKE_ID, name="Mirror", kwargs={"desc": ["GFFS"]})

    def final_scores(exchange: bool, method: str, run_dir) -> dict[str, float]:
        cfg = small_config(seed=0, generations=1, rounds=3)
        cfg.env = EnvConfig(suite=[line, mirror], partners=[PartnerSpec("A", ["Line"]), PartnerSpec("B", ["Mirror"])])
        cfg.learn = LearnConfig(lr=1e-3)
        cfg.rollout = RolloutConfig(episodes=32, group_size=8, num_envs=32, gamma=0.99)
        cfg.loop.exchange, cfg.merge = exchange, MergeConfig(method=method)
        state = loop.run(cfg, run_dir)
        return {s.env: s.normalized for s in state.last_scores["offspring"] if s.policy == "greedy"}

    together = final_scores(True, "linear", tmp_path / "full")
    apart = final_scores(False, "none", tmp_path / "independent")
    assert min(together.values()) >= 0.9, together
    assert min(apart.values()) < 0.9, apart


@pytest.mark.parametrize("imitate_luck", [False, True])
def test_successes_on_a_slippery_map_are_imitated_only_when_asked(tmp_path, imitate_luck):
    # a slippery two-cell line: a random policy reaches the goal in most episodes, partly by luck
    slippery = EnvSpec(LAKE_ID, "Slip", {"desc": ["SG"], "is_slippery": True})
    cfg = small_config(seed=0, generations=1, rounds=1)
    cfg.env = EnvConfig(suite=[slippery], partners=[PartnerSpec("A", ["Slip"]), PartnerSpec("B", ["Slip"])])
    cfg.rollout = RolloutConfig(episodes=8, group_size=8, num_envs=8)
    cfg.eval = EvalConfig(episodes=1)
    cfg.learn.distill_random_envs = imitate_luck
    loop.run(cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [e[f"learn/distill_rows/{e['partner']}"] for e in events if e["event"] == "learn"]
    assert len(rows) == 2 and (all(n > 0 for n in rows) if imitate_luck else rows == [0, 0])
    if not imitate_luck:
        skipped = [e["reason"] for e in events if e["event"] == "distill_skipped"]
        assert skipped and all("partly luck" in reason for reason in skipped)


def test_the_entropy_bonus_is_the_mean_entropy_of_the_legal_action_distribution(partner_factory):
    partner = partner_factory(seed=3)
    rows = small_lake_episodes(partner, 4)
    items = [Item("own", r, 1.0) for r in rows]
    with torch.no_grad():
        without, parts = batch_loss(partner, items, LearnConfig(advantage="return_to_go", entropy_coef=0.0))
        with_bonus, _ = batch_loss(partner, items, LearnConfig(advantage="return_to_go", entropy_coef=0.5))
    probs = partner.policy_probs([r["observation"] for r in rows], ["left", "down", "right", "up"])
    by_hand = float(-(probs * probs.log()).sum(1).mean())
    assert 0 < by_hand <= math.log(4)
    assert float(parts["entropy"]) == pytest.approx(by_hand, abs=1e-5)
    assert float(with_bonus - without) == pytest.approx(-0.5 * by_hand, abs=1e-5)
