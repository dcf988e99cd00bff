"""Populations of more than two partners: every pair's compatibility, partners clustered by it
(merge.fallback=cluster: complete linkage, each cluster merged, the rest routed), mutual learning from every peer,
and four partners through generations of a run, resumed exactly from a generation directory."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from colearn import loop
from colearn.analysis.lineage_plot import lineage_layout
from colearn.analysis.plots import compat_figure
from colearn.breeding.clusters import cluster_config, compatible_groups
from colearn.breeding.compatibility import Compatibility, Drift, PairCompat
from colearn.breeding.kinds import Clustered
from colearn.breeding.mixture import load_mixture, read_manifest
from colearn.breeding.offspring import make_offspring
from colearn.cli.experiment import validate
from colearn.cli.export import main as export_main
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
from colearn.experience.evaluate import evaluate, normalized_by_env
from colearn.experience.store import ExperienceStore
from colearn.learning.learn import mutual_kl
from colearn.models.partner import Partner
from colearn.models.weights import dense_state
from tests.conftest import CLI_TINY, LAKE_ID, tiny_model_config
from tests.test_configs import composed
from tests.test_integrate import ACTIONS, trained
from tests.test_offspring import perturbed, same_weights

torch.set_num_threads(1)

# --- complete linkage on a hand-made similarity matrix ------------------------------------------------------------

SIMILARITY = {
    ("A", "B"): 0.9,
    ("A", "C"): 0.2,
    ("A", "D"): 0.1,
    ("A", "E"): 0.0,
    ("B", "C"): 0.8,
    ("B", "D"): 0.1,
    ("B", "E"): 0.0,
    ("C", "D"): 0.3,
    ("C", "E"): 0.0,
    ("D", "E"): 0.7,
}


def test_complete_linkage_groups_partners_compatible_with_every_other_member():
    names = list("ABCDE")
    assert compatible_groups(names, SIMILARITY, 0.5) == [["A", "B"], ["C"], ["D", "E"]]
    # single linkage would chain C to A through B (B~C 0.8), though A~C is 0.2
    assert compatible_groups(names, SIMILARITY, 0.75) == [["A", "B"], ["C"], ["D"], ["E"]]
    assert compatible_groups(names, SIMILARITY, 0.2) == [["A", "B", "C"], ["D", "E"]]
    assert compatible_groups(names, SIMILARITY, 0.95) == [[n] for n in names]
    assert compatible_groups(names, SIMILARITY, 0.0) == [names]  # threshold 0, as merge.compat_threshold=0: all
    # clusters follow the order the partners are listed in, whichever order a pair is given in
    flipped = {(b, a): v for (a, b), v in SIMILARITY.items()}
    assert compatible_groups(names[::-1], flipped, 0.5) == [["E", "D"], ["C"], ["B", "A"]]


def test_a_tie_between_joins_goes_to_the_earliest_pair():
    chain = {("A", "B"): 0.6, ("A", "C"): 0.1, ("B", "C"): 0.6}
    assert compatible_groups(["A", "B", "C"], chain, 0.5) == [["A", "B"], ["C"]]
    assert compatible_groups(["C", "B", "A"], chain, 0.5) == [["C", "B"], ["A"]]


def test_a_clusters_merge_config_keeps_its_members_weights():
    cfg = MergeConfig(method="linear", weights=[3.0, 1.0, 2.0, 4.0], groups={"head": {"weights": [1, 2, 3, 4]}})
    cut = cluster_config(cfg, [0, 2])
    assert cut.weights == [3.0, 2.0] and cut.groups == {"head": {"weights": [1, 3]}}
    assert cluster_config(MergeConfig(), [1, 3]).weights == []  # equal weights for the cluster


# --- make_offspring with merge.fallback=cluster -------------------------------------------------------------------

COSINES = {("A", "B"): 0.9, ("A", "C"): 0.1, ("A", "D"): 0.0, ("B", "C"): 0.2, ("B", "D"): 0.1, ("C", "D"): 0.3}


def measured(cosines: dict[tuple[str, str], float]) -> Compatibility:
    """A hand-made measurement: the given task-vector cosines, nothing else."""
    pairs = {pair: PairCompat(cosine=v, sign_conflict=0.0, distance=1.0, cka=None) for pair, v in cosines.items()}
    return Compatibility(pairs, {n: Drift(0.5, None) for n in "ABCD"})


@pytest.fixture(scope="module")
def four(ancestor, model_cfg) -> tuple[Partner, list[Partner]]:
    model, tokenizer = ancestor
    root = Partner("ancestor", model, tokenizer, model_cfg)
    envs = ["Lake", "Lake", "MirrorLake", "Taxi"]
    return root, [
        perturbed(root, name, 0.01, seed=30 + i, envs=[env]) for i, (name, env) in enumerate(zip("ABCD", envs))
    ]


def cluster_cfg(**overrides) -> MergeConfig:
    return MergeConfig(
        **{"method": "linear", "compat_metric": "cosine", "compat_threshold": 0.5, "fallback": "cluster", **overrides}
    )


SCORES = {"A": 0.5, "B": 0.4, "C": 0.3, "D": 0.2}


def test_cluster_fallback_merges_the_compatible_pair_by_its_weights_and_routes_by_member_scores(four):
    root, partners = four
    table = {"A+B": {"Lake": 1.0, "MirrorLake": 0.0, "Taxi": 0.2}, "C": {"MirrorLake": 1.0}, "D": {"Taxi": 0.6}}
    table["C"] |= {"Lake": 0.0, "Taxi": 0.0}
    table["D"] |= {"Lake": 0.0, "MirrorLake": 0.0}
    cfg = cluster_cfg(weights=[3.0, 1.0, 1.0, 1.0], gate=False)
    result = make_offspring(
        root, partners, SCORES, cfg, measured=measured(COSINES), env_score_fn=lambda p: table[p.name]
    )
    assert isinstance(result, Clustered) and result.reason == "cosine 0.0000 < merge.compat_threshold 0.5"
    assert [(c["members"], c["outcome"]) for c in result.clusters] == [
        (["A", "B"], "merged"),
        (["C"], "single"),
        (["D"], "single"),
    ]
    assert result.clusters[0]["merge"]["weights"] == [3.0, 1.0]  # the pair's own share of merge.weights
    assert result.routing == {"Lake": "A+B", "MirrorLake": "C", "Taxi": "D"}
    assert [m.name for m in result.members] == ["A+B", "C", "D"] and result.member_scores == table
    a, b = (dense_state(p) for p in partners[:2])
    merged = dense_state(result.members[0])
    assert all(torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6) for k in merged)
    assert result.source == "A+B" and same_weights(result.partner, result.members[0])  # best mean: 0.4
    recipe = result.recipe()
    assert (recipe["method"], recipe["outcome"], recipe["fallback"]) == ("cluster", "fallback", "cluster")
    assert recipe["mixture"] == result.routing and recipe["gate"] == {"skipped": "partners incompatible"}
    # the next generation: A and B start from their merge, C and D go on as they are
    after = result.next_partners(partners)
    assert [p.name for p in after] == ["A", "B", "C", "D"] and after[2] is partners[2] and after[3] is partners[3]
    assert same_weights(after[0], result.members[0]) and same_weights(after[1], result.members[0])
    assert after[1].envs == ["Lake"] and after[0].optimizer is None


def test_a_cluster_whose_merge_the_gate_refuses_is_routed_partner_by_partner(four):
    root, partners = four
    scored = []

    def validate(p: Partner) -> float:
        scored.append(p.name)
        return 0.0 if "+" in p.name else SCORES[p.name]

    env_scores = {"A": {"Lake": 0.9}, "B": {"Lake": 0.1}, "C": {"MirrorLake": 0.8}, "D": {"Taxi": 0.3}}
    result = make_offspring(
        root, partners, SCORES, cluster_cfg(), evaluate_fn=validate, measured=measured(COSINES), env_scores=env_scores
    )
    assert scored == ["A", "B", "C", "D", "A+B"]
    first = result.clusters[0]
    assert (first["name"], first["outcome"], first["gate"]["passed"]) == ("A+B", "refused", False)
    assert first["gate"]["parents"] == {"A": 0.5, "B": 0.4} and first["merge"]["method"] == "linear"
    assert [m.name for m in result.members] == ["A", "B", "C", "D"]
    # without per-member scores each env goes to the member holding the partner best on it
    assert result.routing == {"Lake": "A", "MirrorLake": "C", "Taxi": "D"} and result.member_scores == {}
    assert result.source == "A" and result.promoted  # incompatible partners, not a refused population merge
    assert result.next_partners(partners) == partners


def test_a_whole_population_merge_the_gate_refused_is_not_tried_again(four):
    root, partners = four
    scored = []

    def validate(p: Partner) -> float:
        scored.append(p.name)
        return 0.0 if p.name == "offspring" else SCORES[p.name]

    alike = dict.fromkeys(COSINES, 0.9)
    result = make_offspring(root, partners, SCORES, cluster_cfg(), evaluate_fn=validate, measured=measured(alike))
    assert scored == ["A", "B", "C", "D", "offspring"]
    assert isinstance(result, Clustered) and not result.promoted and result.attempted["method"] == "linear"
    assert [(c["members"], c["outcome"]) for c in result.clusters] == [(["A", "B", "C", "D"], "refused")]
    assert result.clusters[0]["gate"] == result.recipe()["gate"]
    assert result.routing == {"Lake": "A", "MirrorLake": "C", "Taxi": "D"}  # each partner's own env
    # merge.compat_threshold=0 makes every pair compatible: no metric needed (here no CKA was measured)
    scored.clear()
    unmeasured = make_offspring(
        root, partners, SCORES, MergeConfig(fallback="cluster"), evaluate_fn=validate, measured=measured(alike)
    )
    assert [c["outcome"] for c in unmeasured.clusters] == ["refused"] and scored[-1] == "offspring"


# --- deep mutual learning with several peers ---------------------------------------------------------------------


def test_mutual_kl_with_several_teachers_is_the_mean_of_each_ones(four, corpus):
    _, (a, b, c, _) = four
    obs = [o for o in dict.fromkeys(corpus[0]) if "row" in o][:6]  # lake observations
    rows = [{"prompt_ids": p, "legal_actions": ACTIONS} for p in a.prompt_ids(obs)]
    weights = [1, 2, 1, 3, 1, 1][: len(rows)]
    with torch.no_grad():
        alone = [float(mutual_kl(a, [t], rows, weights)) for t in (b, c)]
        assert float(mutual_kl(a, [b, c], rows, weights)) == pytest.approx(sum(alone) / 2, rel=1e-6)
        assert min(alone) > 0 and float(mutual_kl(a, [], rows, weights)) == 0.0


def test_each_partner_learns_mutually_from_a_frozen_copy_of_every_other(four):
    _, partners = four
    cfg = Config(
        learn=LearnConfig(mutual_kl_coef=0.1), env=EnvConfig(partners=[PartnerSpec(n, ["FrozenLake"]) for n in "ABCD"])
    )
    teachers = loop.snapshot_teachers(partners, cfg)
    assert {k: [t.name for t in v] for k, v in teachers.items()} == {
        "A": ["B", "C", "D"],
        "B": ["A", "C", "D"],
        "C": ["A", "B", "D"],
        "D": ["A", "B", "C"],
    }
    assert teachers["A"][0] is teachers["C"][1]  # one frozen copy per partner, shared
    assert teachers["A"][0].model is not partners[1].model and same_weights(teachers["A"][0], partners[1])


# --- four partners through a run ---------------------------------------------------------------------------------

SUITE = [
    EnvSpec(LAKE_ID, "Line", {"desc": ["SFG"]}),  # the goal to the right
    EnvSpec(LAKE_ID, "MirrorLine", {"desc": ["GFS"]}),  # to the left
    EnvSpec(LAKE_ID, "Drop", {"desc": ["SH", "FH", "GH"]}),  # down, with holes to the right
]
PLACES = [PartnerSpec("A", ["Line"]), PartnerSpec("B", ["Line"]), PartnerSpec("C", ["MirrorLine"])]
PLACES.append(PartnerSpec("D", ["Drop"]))


def population_config(generations: int = 1) -> Config:
    """Four partners on three maps; pairs under 0.5 task-vector cosine are incompatible: clustered."""
    return Config(
        model=tiny_model_config(),
        env=EnvConfig(suite=SUITE, partners=PLACES),
        loop=LoopConfig(generations=generations, rounds=1, exchange=False, keep_generations=2),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        eval=EvalConfig(episodes=2),
        progress=False,
        merge=MergeConfig(compat_metric="cosine", compat_threshold=0.5, fallback="cluster"),
    )


def observations(spec: EnvSpec) -> list[str]:
    """Every observation of a small deterministic map reachable in two steps from its start."""
    env = gym.make(spec.id, **spec.kwargs)
    seen = [env.reset(seed=0)[0]]
    for path in itertools.product(ACTIONS, repeat=2):
        env.reset(seed=0)
        for action in path:
            obs, _, terminated, _, _ = env.step(action)
            if terminated:
                break
            seen += [obs] * (obs not in seen)
    env.close()
    return seen


@pytest.fixture(scope="module")
def specialists(ancestor, model_cfg) -> dict[str, Partner]:
    """{base, A, B, C, D}: A and B go right (B a little less surely: two alike specialists), C left, D down,
    on every observation of the three maps; base is the untrained ancestor they were trained from."""
    model, tokenizer = ancestor
    base = Partner("ancestor", model, tokenizer, model_cfg)
    obs = [o for spec in SUITE for o in observations(spec)]

    def toward(action: str) -> dict[str, list[float]]:
        return dict.fromkeys(obs, [1.0 if a == action else 0.0 for a in ACTIONS])

    right = trained(base, "A", ["Line"], toward("right"))
    softer = trained(right, "B", ["Line"], dict.fromkeys(obs, [0.05, 0.05, 0.85, 0.05]), steps=10)
    return {
        "base": base,
        "A": right,
        "B": softer,
        "C": trained(base, "C", ["MirrorLine"], toward("left")),
        "D": trained(base, "D", ["Drop"], toward("down")),
    }


def start(specialists: dict[str, Partner]) -> loop.LoopState:
    base = specialists["base"]
    return loop.LoopState(0, 0, base.clone("ancestor"), [specialists[p.name].clone(p.name, p.envs) for p in PLACES])


@pytest.fixture(scope="module")
def population_run(specialists, tmp_path_factory) -> Path:
    """Two generations of the four specialists; the tests read the first one's offspring."""
    run_dir = tmp_path_factory.mktemp("population") / "run"
    loop.run(population_config(generations=2), run_dir, start(specialists))
    return run_dir


def test_four_partners_merge_the_compatible_pair_and_route_the_rest(population_run):
    run_dir = population_run
    node = json.loads((run_dir / "lineage.json").read_text())[0]
    recipe = node["recipe"]
    assert node["parents"] == ["gen0/A", "gen0/B", "gen0/C", "gen0/D"]
    assert (recipe["method"], recipe["fallback"]) == ("cluster", "cluster") and not recipe["compat"]["compatible"]
    assert [(c["members"], c["outcome"]) for c in recipe["clusters"]] == [
        (["A", "B"], "merged"),
        (["C"], "single"),
        (["D"], "single"),
    ]
    assert recipe["clusters"][0]["gate"]["passed"] and recipe["clusters"][0]["merge"]["method"] == "linear"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = next(e for e in events if e["event"] == "dynamics")
    cosines = {k.removeprefix("compat/cosine/"): v for k, v in pairs.items() if k.startswith("compat/cosine/")}
    assert set(cosines) == {"A~B", "A~C", "A~D", "B~C", "B~D", "C~D"}  # every pair measured
    assert cosines["A~B"] >= 0.5 and max(v for k, v in cosines.items() if k != "A~B") < 0.5
    merge = next(e for e in events if e["event"] == "merge")
    assert merge["clusters"] == {"A+B": "merged", "C": "single", "D": "single"} and merge["promoted"]
    # each specialist solves its own map only; the offspring routes each map to the member that solves it
    assert node["parent_scores"] == {
        "A": {"Line": 1.0, "MirrorLine": 0.0, "Drop": 0.0},
        "B": {"Line": 1.0, "MirrorLine": 0.0, "Drop": 0.0},
        "C": {"Line": 0.0, "MirrorLine": 1.0, "Drop": 0.0},
        "D": {"Line": 0.0, "MirrorLine": 0.0, "Drop": 1.0},
    }
    routing = {"Line": "A+B", "MirrorLine": "C", "Drop": "D"}
    assert recipe["mixture"] == merge["routing"] == routing and node["scores"] == dict.fromkeys(routing, 1.0)
    assert recipe["member_scores"]["A+B"] == {"Line": 1.0, "MirrorLine": 0.0, "Drop": 0.0}


def test_the_clustered_offspring_scores_what_its_routed_members_score(population_run):
    run_dir = population_run
    node = json.loads((run_dir / "lineage.json").read_text())[0]
    gen0 = run_dir / "checkpoints" / "gen_0000"
    manifest = read_manifest(gen0 / "offspring")
    assert manifest["members"] == ["A+B", "C", "D"] and manifest["env_map"] == node["recipe"]["mixture"]
    cfg = population_config()
    mixture = load_mixture(gen0 / "offspring", cfg.model)
    members = {m.name: normalized_by_env(evaluate(m, SUITE, cfg.eval, cfg.rollout)) for m in mixture.members}
    assert {env: members[owner][env] for env, owner in manifest["env_map"].items()} == node["scores"]
    a, b = (dense_state(Partner.load(gen0 / n, n, cfg.model)) for n in "AB")
    merged = dense_state(mixture.members[0])
    assert all(torch.allclose(merged[k], (a[k] + b[k]) / 2, atol=1e-6) for k in merged)  # linear, equal weights
    for member in mixture.members[1:]:  # the routed remainder: the partners as they ended the generation
        assert same_weights(member, Partner.load(gen0 / member.name, member.name, cfg.model))


def test_the_report_and_export_say_which_clusters_were_merged(population_run, tmp_path, capsys):
    run_dir = population_run
    lineage = json.loads((run_dir / "lineage.json").read_text())
    box = lineage_layout(lineage).box("gen0/offspring")
    assert "A+B merged; C, D routed" in box.text.replace("\n", " ")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fig = compat_figure(events)
    cosine_panel = next(ax for ax in fig.axes if ax.get_title() == "task-vector cosine")
    styles = {
        (ln.get_color(), ln.get_linestyle(), ln.get_marker())
        for ln in cosine_panel.get_lines()
        if "~" in ln.get_label()
    }
    assert len(styles) == 6  # one line style per pair of the four partners
    out = tmp_path / "exported"
    export_main([str(run_dir), str(out)])
    assert "a mixture of A+B, C, D" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "merge.fallback=cluster: cosine" in card and "`A+B`: the merge (linear) of A, B" in card
    assert "C, D: partners kept as they were" in card and "| Line | A+B |" in card


def test_the_pair_goes_on_from_its_merge_the_rest_as_they_were_and_a_resume_from_disk_does_the_same(
    specialists, population_run, tmp_path
):
    resumed = tmp_path / "resumed"
    after = loop.run(population_config(generations=1), resumed, start(specialists))  # stops after generation 0
    gen0, cfg = resumed / "checkpoints" / "gen_0000", population_config().model
    merge = Partner.load(gen0 / "offspring" / "members" / "A+B", "A+B", cfg)
    assert [p.name for p in after.partners] == ["A", "B", "C", "D"]
    assert same_weights(after.partners[0], merge) and same_weights(after.partners[1], merge)
    assert after.partners[0].optimizer is None and after.partners[2].optimizer is not None
    for partner in after.partners[2:]:
        assert same_weights(partner, Partner.load(gen0 / partner.name, partner.name, cfg))
    # the next ancestor: the best member by mean validation score (each solves one map; the first of equals)
    assert same_weights(after.ancestor, merge)
    for rounds in (resumed / "checkpoints").glob("round_g*"):
        shutil.rmtree(rounds)  # no round checkpoint: the run goes on from gen_0000/resume.json
    state = loop.run(population_config(generations=2), resumed)
    assert state.generation == 2 and state.lineage[0]["recipe"]["method"] == "cluster"

    def events(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]

    assert events(resumed) == events(population_run)
    lineage = [json.loads((r / "lineage.json").read_text()) for r in (resumed, population_run)]
    assert lineage[0] == lineage[1] and len(lineage[0]) == 2
    gen1 = [r / "checkpoints" / "gen_0001" for r in (resumed, population_run)]
    for name in "ABCD":
        assert same_weights(*(Partner.load(g / name, name, cfg) for g in gen1))
    if lineage[0][1]["recipe"]["outcome"] == "fallback":  # a mixture again (it is, on this CPU)
        one, two = (load_mixture(g / "offspring", cfg).members for g in gen1)
        assert [m.name for m in one] == [m.name for m in two] and all(map(same_weights, one, two))
    else:
        assert same_weights(*(Partner.load(g / "offspring", "offspring", cfg) for g in gen1))


def test_the_four_partner_preset_shares_every_partners_steps_and_merges_all_four(tmp_path):
    cfg = composed(["env=four_partners", *CLI_TINY, "probe_size=4", "learn.mutual_kl_coef=0.1", "learn.epochs=2"])
    validate(cfg)
    assert [(p.name, p.envs) for p in cfg.env.partners] == [
        ("A", ["Lake"]),
        ("B", ["MirrorLake"]),
        ("C", ["SlipperyLake"]),
        ("D", ["Addition1"]),
    ]
    loop.run(cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = Counter(r["partner"] for r in ExperienceStore(tmp_path / "experience").select())
    for e in (e for e in events if e["event"] == "learn"):
        name = e["partner"]
        own, peers = steps[name], sum(n for p, n in steps.items() if p != name)
        assert e[f"learn/rows/{name}"] == own + peers + e[f"learn/distill_rows/{name}"]  # GAE keeps every step
    assert sorted(e["partner"] for e in events if e["event"] == "learn") == list("ABCD")
    dynamics = next(e for e in events if e["event"] == "dynamics")
    assert len([k for k in dynamics if k.startswith("compat/cka/") and "ancestor" not in k]) == 6
    modes = {e["mode"] for e in events if e["event"] == "integrate"}
    assert modes == {"route", "ensemble"}  # check_and_control and consultative need exactly two members
    recipe = json.loads((tmp_path / "lineage.json").read_text())[0]["recipe"]
    tried = recipe if recipe["outcome"] == "merged" else recipe["attempted"]
    assert tried["method"] == "linear" and tried["weights"] == [0.25] * 4
