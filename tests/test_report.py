"""Tests of colearn.analysis.report: reports of a real tiny run (the loop run in-process), and sweep comparisons."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from colearn.analysis.dynamics import pair_metrics, probe_set
from colearn.analysis.lineage_plot import MAX_WIDTH, lineage_figure, lineage_layout
from colearn.analysis.plots import merge_gain_figure, merge_gains, search_figure, sweep_figure, transfer_figure
from colearn.analysis.report import searches_of, t_interval, t_quantile, write_compare, write_report
from colearn.breeding.compatibility import measure
from colearn.breeding.integrate import evaluate_modes
from colearn.cli.main import subcommand
from colearn.config import Config, EnvConfig, EnvSpec, EvalConfig, LoopConfig, ModelConfig, PartnerSpec, RolloutConfig
from colearn.errors import ColearnError
from colearn.loop import LoopState, run
from colearn.rundir.logger import Logger, read_metrics

SUITE = [
    EnvSpec("colearn/FrozenLake-v0", name="Line", kwargs={"desc": ["SFG"]}),
    EnvSpec("colearn/FrozenLake-v0", name="MirrorLine", kwargs={"desc": ["GFS"]}),
]
PLOTS = [
    "report_returns.png",
    "report_lineage.png",
    "report_merge_gain.png",
    "report_modes.png",
    "report_compat.png",
    "report_learning_from.png",
]


def tiny_config() -> Config:
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
        loop=LoopConfig(generations=2, rounds=1),
        rollout=RolloutConfig(episodes=16, group_size=4, num_envs=16),
        eval=EvalConfig(episodes=2, sampled=True),
        env=EnvConfig(suite=SUITE, partners=[PartnerSpec("A", ["Line"]), PartnerSpec("B", ["MirrorLine"])]),
        progress=False,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, LoopState]:
    """A real two-generation run of the loop: its directory and final state."""
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run(tiny_config(), run_dir)


@pytest.fixture(scope="module")
def plain_run(finished) -> Path:
    """The run directory as the loop leaves it."""
    return finished[0]


@pytest.fixture(scope="module")
def full_run(finished, tmp_path_factory) -> Path:
    """A copy of the run plus the events the loop logs through dynamics and integrate (compat, integrate)."""
    plain, state = finished
    run_dir = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(plain, run_dir)
    cfg = tiny_config()
    steps = [e["step"] for e in read_metrics(run_dir) if e["event"] == "merge"]
    log = Logger(run_dir, tensorboard=False)
    for step in steps:  # the final partners stand in for each generation's: enough to draw the lines
        log.write("compat", step, **pair_metrics(measure(state.ancestor, state.partners, probe_set(SUITE, 4))))
    for record in evaluate_modes(state.partners, SUITE, ["route", "ensemble"], cfg.eval, cfg.rollout):
        log.write("integrate", steps[-1], generation=1, **record)
    log.close()
    return run_dir


def images_of(html: str) -> list[str]:
    """Returns the file each embedded image of a page was saved as (its id names it)."""
    return [f"{stem}.png" for stem in re.findall(r'<img id="([^"]+)"', html)]


def test_report_of_a_full_run_shows_every_plot_offline(full_run):
    html = write_report(full_run).read_text()
    assert sorted(images_of(html)) == sorted(PLOTS)
    for name in PLOTS:
        data = (full_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html


def test_report_embeds_its_images_and_can_be_moved_alone(full_run, tmp_path):
    html = write_report(full_run).read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(sources) == len(PLOTS) and "url(" not in html
    for name, source in zip(images_of(html), sources):
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), source[:40]  # no file reference, relative or absolute
        assert base64.b64decode(source.removeprefix(prefix)) == (full_run / name).read_bytes()
    moved = tmp_path / "report.html"
    shutil.copy(full_run / "report.html", moved)  # alone, without the PNGs
    assert re.findall(r'src="(?!data:)', moved.read_text()) == []


def test_report_table_holds_the_final_scores(full_run):
    html = write_report(full_run).read_text()
    lineage = json.loads((full_run / "lineage.json").read_text())
    assert [n["id"] for n in lineage] == ["gen0/offspring", "gen1/offspring"]
    table = html.split("<h2>Final scores</h2>")[1].split("<h2>")[0]
    rows = re.findall(r"<tr><td>(\w+) <span class='muted'>greedy, gen (\d)</span>", table)
    assert rows == [("ancestor", "0"), ("A", "1"), ("B", "1"), ("offspring", "1")]  # start, partners, product
    final = lineage[-1]["scores"]["Line"]
    assert f"{final:.2f} <span class='muted'>(" in table.split("offspring <span class='muted'>greedy")[1]


def test_report_of_a_plain_run_says_what_is_missing(plain_run):
    html = write_report(plain_run).read_text()
    # a pair always logs compatibility; integration modes only when integrate.modes is set
    assert sorted(images_of(html)) == [
        "report_compat.png",
        "report_learning_from.png",
        "report_lineage.png",
        "report_merge_gain.png",
        "report_returns.png",
    ]
    assert "Not available: no integrate events in this run." in html
    assert "Merge recipe search" not in html and not (plain_run / "report_search.png").exists()  # no empty section


def test_missing_or_empty_runs_are_user_errors(tmp_path):
    with pytest.raises(ColearnError, match=re.escape(str(tmp_path / "nowhere"))):
        subcommand("report")([str(tmp_path / "nowhere")])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ColearnError, match="is empty"):
        write_report(tmp_path)
    with pytest.raises(ColearnError, match="no runs"):
        write_compare(tmp_path)


def test_t_interval_matches_student_t():
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.0003, abs=1e-3) and t_quantile(1000) == pytest.approx(1.9623, abs=1e-3)
    assert t_interval([0.5])[1] != t_interval([0.5])[1]  # NaN: one seed has no interval


def test_compare_groups_presets_and_seeds(plain_run, tmp_path, capsys):
    """Four copies of the real run as a sweep; each gets a last offspring score on Line chosen by hand."""
    finals = {("full", 0): 0.5, ("full", 1): 0.7, ("independent", 0): 0.2, ("independent", 1): 0.2}
    for i, ((preset, seed), value) in enumerate(finals.items()):
        run_dir = tmp_path / f"{i}_experiment={preset},seed={seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        shutil.copy(plain_run / "metrics.jsonl", run_dir / "metrics.jsonl")
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            f"- experiment={preset}\n- seed={seed}\n- loop.generations=2\n"
        )
        log = Logger(run_dir, tensorboard=False)
        log.write(
            "eval",
            10_000,
            generation=2,
            round=0,
            partner="offspring",
            env="Line",
            policy="greedy",
            own_env=False,
            mean_return=value,
            success=value,
            optimal=1.0,
            normalized=value,
        )
        log.close()
    subcommand("compare")([str(tmp_path)])
    html = (tmp_path / "compare.html").read_text()
    offspring = html.split("<h2>Final offspring</h2>")[1].split("<h2>")[0]
    rows = dict(re.findall(r"<tr><td>([a-z]+)</td><td>2</td><td[^>]*>([^<]+)<", offspring))
    assert rows == {"full": "0.60 ", "independent": "0.20 "}
    assert f"± {12.706 * 0.1:.2f}" in offspring  # sd 0.1414 / sqrt(2) * t(1)
    assert "loop.generations=2" in html  # shared overrides are listed once, not in the preset names
    assert images_of(html) == ["compare_returns.png"]
    assert (tmp_path / "compare_returns.png").read_bytes()[:4] == b"\x89PNG"
    # the console gets the same numbers as a table, the offspring's first
    printed = capsys.readouterr().out
    table = printed.split("final offspring")[1].split("final partners")[0].splitlines()
    header = next(line for line in table if line.startswith("preset"))
    assert header.split() == ["preset", "seeds", "Line", "MirrorLine", "mean", "over", "envs"]
    cells = {line.split()[0]: line.split()[1:] for line in table if line.startswith(("full", "independent"))}
    assert cells["full"][:4] == ["2", "0.60", "±", f"{12.706 * 0.1:.2f}"]
    assert cells["independent"][:4] == ["2", "0.20", "±", "0.00"]
    assert printed.rstrip().endswith(f"compare: {tmp_path / 'compare.html'}")


# A merge search by hand: fitness per evaluation (0: the uniform recipe), held-out re-scores of uniform and winner.
FITNESS = [0.30, 0.10, 0.55, 0.40, 0.70, 0.20]


def search_record(fitness: list[float], heldout: float | None = 0.45, heldout_uniform: float | None = 0.25) -> dict:
    running = [max(fitness[: i + 1]) for i in range(len(fitness))]
    record = {
        "budget": len(fitness),
        "fitness": max(fitness),
        "uniform_fitness": fitness[0],
        "curve": [{"evaluation": i, "fitness": f, "best": b} for i, (f, b) in enumerate(zip(fitness, running))],
    }
    if heldout is not None:
        record |= {"heldout": heldout, "heldout_uniform": heldout_uniform}
    return record


def test_search_figure_draws_candidates_best_so_far_uniform_and_held_out():
    fig = search_figure(
        {
            "generation 0 (ties)": search_record(FITNESS),
            "generation 1 (ties)": search_record([0.5, 0.6, 0.2], heldout=None),
        }
    )
    first, second = fig.axes[:2]
    assert [first.get_title(), second.get_title()] == ["generation 0 (ties)", "generation 1 (ties)"]
    assert first.get_xlabel() == "evaluation" and "mean normalized return" in first.get_ylabel()
    assert "search episodes" in first.get_ylabel()
    lines = {line.get_label(): line for line in first.lines}
    assert list(lines["best so far"].get_ydata()) == [0.30, 0.30, 0.55, 0.55, 0.70, 0.70]  # the running max
    assert list(lines["best so far"].get_xdata()) == list(range(6))
    assert lines["best so far"].get_drawstyle() == "steps-post"
    assert list(lines["uniform recipe (evaluation 0)"].get_ydata()) == [0.30, 0.30]  # a horizontal line
    dots = {c.get_label(): c.get_offsets().tolist() for c in first.collections}
    assert dots["candidate"] == [[i, f] for i, f in enumerate(FITNESS)]
    ((x_uniform, y_uniform),) = dots["held-out: uniform recipe"]
    ((x_best, y_best),) = dots["held-out: best recipe"]
    assert (y_uniform, y_best) == (0.25, 0.45) and x_uniform == x_best > 5  # right of the last evaluation
    assert max(first.get_xticks()) == 5  # evaluations are numbered; the held-out column is not
    assert "held-out" in [t.get_text() for t in first.texts]
    # without held-out scores there are no held-out markers, but the curve is drawn
    assert not [c for c in second.collections if "held-out" in c.get_label()]
    assert list({line.get_label(): line for line in second.lines}["best so far"].get_ydata()) == [0.5, 0.6, 0.6]
    plt.close(fig)


def test_search_figure_is_none_without_a_curve():
    assert search_figure({}) is None and search_figure({"gen 0": {"budget": 0, "curve": []}}) is None


def test_report_of_a_searched_run_plots_the_search(plain_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(plain_run, run_dir)
    for name in run_dir.glob("report*"):
        name.unlink()
    lineage = json.loads((run_dir / "lineage.json").read_text())
    lineage[0]["recipe"] = {
        "method": "copy_best",
        "outcome": "fallback",
        "gate": {"passed": False},
        "attempted": {"method": "evolve", "base_method": "dare_ties", "search": search_record([0.2, 0.4], heldout=0.1)},
    }
    lineage[1]["recipe"] = {"method": "evolve", "base_method": "ties", "search": search_record(FITNESS)}
    (run_dir / "lineage.json").write_text(json.dumps(lineage))
    assert searches_of(lineage) == {
        "generation 0 (dare_ties, gate failed: not used)": search_record([0.2, 0.4], heldout=0.1),
        "generation 1 (ties)": search_record(FITNESS),
    }
    assert searches_of([{"generation": 0, "recipe": {"method": "copy_best", "outcome": "fallback"}}]) == {}
    html = write_report(run_dir).read_text()
    section = html.split("<h2>Merge recipe search</h2>")[1].split("<h2>")[0]
    assert "held-out" in section and "optimistic" in section
    assert images_of(section) == ["report_search.png"]
    image = Image.open(run_dir / "report_search.png")
    assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert len(image.convert("RGB").getcolors(maxcolors=100_000)) > 20  # drawn on, not a blank canvas


# -- the figures' data ----------------------------------------------------------------------------------


def five_generations(lineage: list[dict]) -> list[dict]:
    """The real run's lineage stretched to five generations, with the longest labels a node can have: a
    gate-failed fallback's recipe and long env names."""
    nodes = []
    for g in range(5):
        node = json.loads(json.dumps(lineage[g % len(lineage)]).replace("MirrorLine", "MirrorLineWithALongName"))
        node["generation"] = g
        node["parents"] = [f"gen{g}/{p.split('/')[-1]}" for p in node["parents"]]
        if g == 2:
            node["recipe"] = {
                "method": "copy_best",
                "source": "A",
                "outcome": "fallback",
                "gate": {"passed": False, "offspring": 0.1, "best_parent": 0.6},
            }
        nodes.append(node)
    return nodes


def overlap(a, b, margin: float = 0.05) -> bool:
    return (
        a.left < b.right + margin
        and b.left < a.right + margin
        and a.bottom < b.top + margin
        and b.bottom < a.top + margin
    )


def test_lineage_of_five_generations_lays_out_boxes_that_neither_overlap_nor_clip(plain_run):
    lineage = five_generations(json.loads((plain_run / "lineage.json").read_text()))
    layout = lineage_layout(lineage)
    keys = [b.key for b in layout.boxes]
    assert len(keys) == len(set(keys))
    assert {f"gen{g}/{who}" for g in range(5) for who in ("A", "B", "offspring")} | {"gen0/ancestor"} <= set(keys)
    assert [(a, b) for a, b in itertools.combinations(layout.boxes, 2) if overlap(a, b)] == []
    assert all(
        0 <= b.left and b.right <= layout.width and 0 <= b.bottom and b.top <= layout.height for b in layout.boxes
    )
    assert layout.width <= MAX_WIDTH  # five generations wrap onto rows instead of shrinking on the page
    for g in range(5):  # each partner descends from its generation's ancestor and into its offspring
        assert (f"gen{g}/A", f"gen{g}/offspring") in layout.arrows
        assert any(
            target == f"gen{g}/A" and source in (f"gen{g}/ancestor", f"gen{g - 1}/offspring")
            for source, target in layout.arrows
        )
    # the measured text fits its box once drawn
    fig = lineage_figure(lineage)
    fig.canvas.draw()
    inches = fig.dpi_scale_trans.inverted()
    for text in (t for t in fig.axes[0].texts if t.get_gid()):
        box, drawn = layout.box(text.get_gid()), text.get_window_extent().transformed(inches)
        assert box.left <= drawn.x0 and drawn.x1 <= box.right and box.bottom <= drawn.y0 and drawn.y1 <= box.top, (
            text.get_gid()
        )
    plt.close(fig)


def test_a_merge_the_gate_rejected_shows_its_own_loss(plain_run, tmp_path):
    events = read_metrics(plain_run)
    merges = [e for e in events if e["event"] == "merge"]
    rejected = merges[0]
    rejected.update(
        method="copy_best",
        outcome="fallback",
        promoted=False,
        recipe={
            "method": "copy_best",
            "source": "A",
            "outcome": "fallback",
            "gate": {"offspring": 0.25, "best_parent": 0.75, "passed": False},
            "attempted": {"method": "ties", "density": 0.5},
        },
        **{f"merge/gain/{env}": 0.0 for env in ("Line", "MirrorLine")},
    )  # the fallback copy's
    gains = merge_gains(events)
    assert (gains[0].status, gains[0].method, gains[0].validation, gains[0].by_env) == ("rejected", "ties", -0.5, {})
    fig = merge_gain_figure(events)
    ax = fig.axes[0]
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert -0.5 in heights  # the merge's loss is drawn, not the fallback's +0.00
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [round(p.get_height(), 6) for p in hatched] == [-0.5]
    assert "rejected" in ax.get_xticklabels()[0].get_text() and "ties" in ax.get_xticklabels()[0].get_text()
    plt.close(fig)


def test_transfer_panels_tell_a_partners_envs_apart(plain_run):
    fig = transfer_figure(read_metrics(plain_run))
    for ax in fig.axes:
        styles = defaultdict(list)  # owner -> (line style, marker) of each of its lines
        for line in ax.lines:
            if " on " in line.get_label():
                styles[line.get_label().split(" on ")[0]].append((str(line.get_linestyle()), line.get_marker()))
        assert all(len(set(s)) == len(s) for s in styles.values()), styles
    assert len(styles["A"]) == 2  # forgetting: A on both envs, each its own style
    plt.close(fig)


def test_sweep_figure_scales_to_the_means_not_to_a_wide_interval():
    """Two seeds give a t-interval of several units: the band is cut at the axes, which span the means and the
    optimum."""
    curves = {"full": {"Lake": [(0, 0.0, 0.0), (1000, 0.5, 6.35)]}, "independent": {"Lake": [(0, 0.0, 0.0)]}}
    fig = sweep_figure(curves, ceiling=True)
    low, high = fig.axes[0].get_ylim()
    plt.close(fig)
    assert -0.1 < low < 0 and 1 < high < 1.1
