"""Tests of what a run shows a person while and after it runs: TensorBoard scalars, the progress bar's phases,
log lines and warnings printed above the bar, the merge search's progress."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

import colearn.breeding.offspring
import colearn.loop
import colearn.merging.evolve
from colearn.breeding.compatibility import measure
from colearn.cli.console import logs_above_bars
from colearn.config import (
    Config,
    EnvConfig,
    EnvSpec,
    EvalConfig,
    IntegrateConfig,
    LoopConfig,
    MergeConfig,
    ModelConfig,
    PartnerSpec,
    RolloutConfig,
)
from colearn.loop import run
from colearn.rundir.logger import read_metrics, tensorboard_scalars

SUITE = [
    EnvSpec("colearn/FrozenLake-v0", name="Line", kwargs={"desc": ["SFG"]}),
    EnvSpec("colearn/FrozenLake-v0", name="MirrorLine", kwargs={"desc": ["GFS"]}),
]


class RecordingBar(tqdm):
    """A tqdm that remembers every description it was given and every update, in order."""

    calls: list[tuple[str, object]] = []

    def set_description(self, desc=None, refresh=True):
        RecordingBar.calls.append(("phase", desc))
        super().set_description(desc, refresh)

    def update(self, n=1):
        RecordingBar.calls.append(("update", n))
        return super().update(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real two-generation, two-round run with integration modes, its progress bar recorded."""
    cfg = Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
        loop=LoopConfig(generations=2, rounds=2),
        rollout=RolloutConfig(episodes=8, group_size=4, num_envs=8),
        eval=EvalConfig(episodes=2, sampled=True),
        env=EnvConfig(suite=SUITE, partners=[PartnerSpec("A", ["Line"]), PartnerSpec("B", ["MirrorLine"])]),
        integrate=IntegrateConfig(modes=["route", "ensemble"]),
        progress=True,
    )
    path = tmp_path_factory.mktemp("run")
    RecordingBar.calls = []
    MEASURED.clear()

    def counted(*args):
        MEASURED.append(args)
        return measure(*args)

    def refused(*args):
        raise AssertionError("the offspring measured compatibility again instead of reading the loop's")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(colearn.loop, "tqdm", lambda **kw: RecordingBar(**kw, file=io.StringIO()))
        patch.setattr(colearn.loop, "measure", counted)
        patch.setattr(colearn.breeding.offspring, "measure", refused)
        run(cfg, path)
    return path


MEASURED: list[tuple] = []  # the arguments of every compatibility measurement the run's loop took


def scalars(run_dir: Path) -> dict[str, list[int]]:
    """Returns {tag: [step of each point]} of the run's TensorBoard event files."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [s.step for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_has_one_series_per_tag_with_one_point_per_step(run_dir):
    tags = scalars(run_dir)
    flat = [t for t in tags if "/" not in t]
    assert flat == []  # generation, round, mean_return, success, optimal, normalized, episodes mixed every series
    repeated = {t: {s: n for s, n in Counter(steps).items() if n > 1} for t, steps in tags.items()}
    assert {t: r for t, r in repeated.items() if r} == {}
    # the series a person looks for are there, one per policy, owner and env
    for owner in ("A", "B", "offspring"):
        assert len(tags[f"return/greedy/{owner}/Line"]) >= 2
    assert len(tags["integrate/greedy/route/MirrorLine"]) == 2  # once per generation
    assert len(tags["time/learn"]) == 4 and len(tags["merge/gain"]) == 2


def test_tensorboard_gets_only_finite_namespaced_numbers():
    fields = {
        "generation": 1,
        "mean_return": 0.5,
        "return/greedy/A/Line": 0.5,
        "merge/gate/passed": True,
        "loss/A": float("nan"),
        "env": "Line",
        "time/eval": 0.25,
    }
    assert tensorboard_scalars(fields) == {"return/greedy/A/Line": 0.5, "time/eval": 0.25}


def test_the_progress_bar_names_each_phase_of_a_generations_end(run_dir):
    calls = RecordingBar.calls
    updates = [i for i, (kind, _) in enumerate(calls) if kind == "update"]
    assert len(updates) == 4  # one per round
    # between the generation's last round and the next generation's first action: the end's phases, in order
    end = [desc for kind, desc in calls[updates[1] + 1 :] if kind == "phase"]
    end = end[: end.index("colearn: act")]
    assert end[:2] == ["colearn: integrate", "colearn: integrate (route)"]
    assert end.index("colearn: integrate (ensemble)") < end.index("colearn: breed") < end.index("colearn: eval")
    assert end.index("colearn: eval") < end.index("colearn: save_generation") < end.index("colearn: checkpoint")
    assert calls[-1] == ("phase", "colearn")  # a finished run's bar is named plainly again


def test_compatibility_is_measured_once_a_round_and_the_offspring_decides_on_the_last(run_dir):
    assert len(MEASURED) == 4  # one per round; breeding took none of its own (its `measure` raises)
    events = read_metrics(run_dir)
    for generation in (0, 1):
        last = [e for e in events if e["event"] == "dynamics" and e["generation"] == generation][-1]
        merge = next(e for e in events if e["event"] == "merge" and e["generation"] == generation)
        assert merge["recipe"]["compat"]["cosine"] == last["compat/cosine/A~B"]
        assert merge["recipe"]["compat"]["cka"] == last["compat/cka/A~B"]


def test_log_lines_and_warnings_print_above_the_bar_not_onto_it(capsys):
    console = logging.StreamHandler(sys.stderr)  # a console handler, as Hydra's, writing where the bar draws
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(console)
    try:
        with logs_above_bars(), tqdm(total=3, file=sys.stderr, ascii=True, mininterval=0) as bar:
            bar.update(1)
            logging.getLogger("colearn.loop").warning("entropy collapsed")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("a library complains", stacklevel=1)
            bar.update(1)
    finally:
        root.removeHandler(console)
    text = capsys.readouterr().err
    for message in ("entropy collapsed", "a library complains"):
        before = text.split(message)[0]
        line = before[max(before.rfind("\r"), before.rfind("\n")) + 1 :]  # what the terminal line held before it
        assert "1/3" not in line, repr(line)
    assert "2/3" in text.split("a library complains")[-1]  # the bar is drawn again below the messages


def test_merge_search_moves_a_bar_per_candidate(monkeypatch):
    bars = []

    class Bar(RecordingBar):
        def __init__(self, **kw):
            super().__init__(**{**kw, "disable": False, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(colearn.merging.evolve, "tqdm", Bar)
    RecordingBar.calls = []
    torch.manual_seed(0)
    ancestor = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(3, 4)}
    partners = [{k: torch.randn(v.shape) for k, v in ancestor.items()} for _ in range(2)]

    def fitness(state: dict) -> float:
        return -float(state["lm_head.weight"].abs().sum())

    colearn.merging.evolve.search(ancestor, partners, fitness, MergeConfig(method="evolve", search_budget=7))
    assert len(bars) == 1 and bars[0].total == 7 and bars[0].n == 7
    assert [c for c in RecordingBar.calls if c[0] == "update"] == [("update", 1)] * 7
