"""Reports a person looks at first: a run's page (`colearn report RUN_DIR`) and a sweep's (`colearn compare SWEEP_DIR`).

Each writes one self-contained HTML page (inline CSS, its figures embedded as PNG data URIs: the page
can be moved or mailed alone, and nothing is fetched from the network), and each figure also as a PNG
beside it, built from what the run left on disk: metrics.jsonl, lineage.json and Hydra's
.hydra/{config,overrides}.yaml.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from colearn.analysis import plots
from colearn.analysis.lineage_plot import lineage_figure
from colearn.errors import ColearnError
from colearn.rundir.logger import read_metrics

Event = dict[str, Any]


@dataclass
class Run:
    path: Path
    events: list[Event]
    lineage: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml; empty for runs started in code
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml, e.g. ["experiment=full", "seed=1"]


def load_run(path: str | Path) -> Run:
    """Returns the run stored in `path`, or a ColearnError naming the path when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise ColearnError(f"run directory {str(path)!r} does not exist")
    if not (path / "metrics.jsonl").is_file():
        raise ColearnError(f"{str(path)!r} has no metrics.jsonl; is it a colearn run directory?")
    events = read_metrics(path)
    if not events:
        raise ColearnError(f"{str(path / 'metrics.jsonl')!r} is empty; the run logged nothing yet")
    lineage = json.loads((path / "lineage.json").read_text()) if (path / "lineage.json").is_file() else []
    return Run(
        path,
        events,
        lineage,
        read_yaml(path / ".hydra" / "config.yaml") or {},
        read_yaml(path / ".hydra" / "overrides.yaml") or [],
    )


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


# -- numbers for tables ---------------------------------------------------------------------------------

T_975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]  # Student t 97.5% quantiles, df = 1..30


def t_quantile(df: int) -> float:
    """Returns the 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile: exact to 3 decimals past df 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Returns (mean, half-width of the 95% t-interval) of replicate values; half-width NaN for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n)


def main_policy(events: list[Event]) -> str:
    return "greedy" if any(e.get("policy") == "greedy" for e in plots.of(events, "eval")) else "sampled"


def final_scores(events: list[Event]) -> dict[tuple[str, str], dict[str, Event]]:
    """Returns {(owner, policy): {env: its last eval event}}: every policy's latest score per env."""
    out: dict[tuple[str, str], dict[str, Event]] = {}
    for e in plots.of(events, "eval"):
        out.setdefault((e["partner"], e["policy"]), {})[e["env"]] = e
    return out


# -- the run report -------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1150px; color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; }
.sub { color: #666; font-size: 13px; margin-top: 0; }
.cap { color: #555; font-size: 13px; margin: 2px 0 8px; }
img { max-width: 100%; display: block; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { padding: 4px 10px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f6f6; }
td.best { font-weight: bold; }
.muted { color: #999; } .note { color: #888; font-style: italic; font-size: 13px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 13px; margin: 8px 0; }
dt { color: #666; } dd { margin: 0; }
"""

SECTIONS: list[tuple[str, str, Callable[[Run], Any], str, str | None]] = [
    # (file stem, heading, figure of the run, caption, what is missing when there is no figure; None: the
    # section only exists in runs that have it, e.g. a merge search, so other runs get no empty heading)
    (
        "returns",
        "Return against environment steps",
        lambda r: plots.returns_figure(r.events),
        "Evaluation on fixed seeds after every round. Solid: greedy policy, dotted: sampled; stars: each "
        "generation's offspring; dashed: the optimal return (value iteration); grey verticals: merges.",
        "no eval events",
    ),
    (
        "lineage",
        "Lineage",
        lambda r: lineage_figure(r.lineage),
        "Each generation's partners start as copies of the ancestor and are merged into the offspring, which "
        "becomes the next ancestor. Scores: normalized greedy return per env.",
        "no lineage.json yet",
    ),
    (
        "merge_gain",
        "Merge gain",
        lambda r: plots.merge_gain_figure(r.events),
        "The merged model's normalized return minus its better parent's. Colored bars: per env on the evaluation "
        "seeds, for a merge that became the offspring. Grey: the promotion gate's measure, mean over envs on its "
        "validation episodes; red hatched: a merge the gate rejected (the offspring was then a fallback, so its "
        "loss is the merge's, not the offspring's).",
        "no merge events",
    ),
    (
        "search",
        "Merge recipe search",
        lambda r: plots.search_figure(searches_of(r.lineage)),
        "CMA-ES over the merge recipe (merge=evolve), per generation: every candidate's fitness, the best so far "
        "and the uniform recipe it started from. Fitness on the search episodes is optimistic, since the winner "
        "was picked on those very episodes; the held-out scores at the right, on episodes the search never saw, "
        "are the numbers to trust.",
        None,
    ),
    (
        "modes",
        "Integration modes",
        lambda r: plots.modes_figure(r.events),
        "The partners integrated at inference time (lavender: route, ensemble, check-and-control, consultative) "
        "next to each partner alone and the merged offspring, on the same evaluation seeds.",
        "no integrate events in this run",
    ),
    (
        "compat",
        "Compatibility over time",
        lambda r: plots.compat_figure(r.events),
        "How alike the partners are: CKA of hidden states on a fixed probe set, cosine and sign conflicts "
        "of their task vectors, and distance in weight space.",
        "no compat/* metrics in this run",
    ),
    (
        "learning_from",
        "Who learns what from whom",
        lambda r: plots.transfer_figure(r.events),
        "Left: each partner's normalized greedy return on envs it never acted in (learned only from its "
        "partner's experience and the merges). Right: forgetting, each partner's best-so-far minus current "
        "return per env (above 0: something learned earlier was lost, e.g. when a curriculum moved on). "
        "Color: the partner; line style and marker: the env.",
        "no dynamics events in this run",
    ),
]


def searches_of(lineage: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Returns {"generation G (operator)": search record} of every lineage node whose recipe was searched,
    including searches whose winner the promotion gate refused (kept under the fallback's "attempted")."""
    out = {}
    for node in lineage:
        recipe = node.get("recipe") or {}
        refused = recipe.get("attempted") or {}
        searched = recipe if isinstance(recipe.get("search"), dict) else refused
        if isinstance(searched.get("search"), dict):  # an incompatible pair's fallback never searched
            operator = searched.get("base_method", searched.get("method"))
            note = ", gate failed: not used" if searched is refused else ""
            out[f"generation {node.get('generation')} ({operator}{note})"] = searched["search"]
    return out


def write_report(run_dir: str | Path) -> Path:
    """Writes RUN_DIR/report.html and its PNGs (report_*.png); returns the HTML path."""
    run = load_run(run_dir)
    parts = [header_html(run), "<h2>Final scores</h2>", final_table_html(run.events)]
    for stem, heading, figure, caption, missing in SECTIONS:
        fig = figure(run)
        if fig is None:
            if missing is not None:
                parts.append(f'<h2>{heading}</h2><p class="note">Not available: {missing}.</p>')
            continue
        image = embedded_png(fig, run.path / f"report_{stem}.png", heading)
        parts.append(f'<h2>{heading}</h2><p class="cap">{caption}</p>{image}')
    parts.append(warnings_html(run.events))
    out = run.path / "report.html"
    out.write_text(page(f"colearn run {run.path.name}", parts), encoding="utf-8")
    return out


def save_png(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight", facecolor="white")
    plots.plt.close(fig)


def embedded_png(fig, path: Path, alt: str) -> str:
    """Saves the figure as the PNG `path` and returns an <img> holding that PNG as a data URI (its id: the
    file's stem), so the page shows it without the file."""
    save_png(fig, path)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img id="{html.escape(path.stem)}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, parts: list[str]) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def header_html(run: Run) -> str:
    """Returns the title and a run-at-a-glance list: envs, partners, schedule, merge, steps, wall time."""
    ev, cfg = run.events, run.config
    evals = plots.of(ev, "eval")
    partners = sorted({e["partner"] for e in evals if e.get("own_env")})
    acts = {p: sorted({e["env"] for e in evals if e["partner"] == p and e.get("own_env")}) for p in partners}
    facts = {
        "overrides": " ".join(run.overrides) or "(none: the defaults)",
        "envs": ", ".join(plots.envs_of(ev)),
        "partners": "; ".join(f"{p} acts in {', '.join(envs)}" for p, envs in acts.items()),
        "generations × rounds": schedule(evals),
        "merge": ", ".join(dict.fromkeys(str(e.get("method")) for e in plots.of(ev, "merge"))) or "none yet",
        "environment steps": f"{max(e.get('step', 0) for e in ev):,}",
        "wall time": f"{(ev[-1].get('time', 0) - ev[0].get('time', 0)) / 60:.1f} min (first to last event)",
    }
    if cfg.get("model"):
        m = cfg["model"]
        facts["model"] = (
            f"{m.get('source')} (hidden {m.get('hidden_size')}, {m.get('num_layers')} layers)"
            if m.get("source") == "tiny"
            else str(m.get("source"))
        )
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items() if v)
    return (
        f"<h1>colearn run <code>{html.escape(run.path.name)}</code></h1>"
        f'<p class="sub">{html.escape(str(run.path.resolve()))}</p><dl>{rows}</dl>'
    )


def schedule(evals: list[Event]) -> str:
    """Returns "generations × rounds" as far as the run got (partner evaluations: one per round)."""
    rounds = {(e["generation"], e["round"]) for e in evals if e["partner"] not in plots.FIXED}
    if not rounds:
        return ""
    gens, per_gen = 1 + max(g for g, _ in rounds), 1 + max(r for _, r in rounds)
    return f"{gens} × {per_gen}" + ("" if len(rounds) == gens * per_gen else " (the last generation unfinished)")


def final_table_html(events: list[Event]) -> str:
    """Returns the final-scores table: one row per (policy owner, policy), one column per env, each cell
    the normalized return with mean return and success rate; the best per column in bold."""
    finals = final_scores(events)
    if not finals:
        return '<p class="note">No evaluations yet.</p>'
    envs = plots.envs_of(events)
    best = {env: best_of([c[env]["normalized"] for c in finals.values() if env in c]) for env in envs}
    head = "".join(f"<th>{html.escape(env)}</th>" for env in envs)
    rows = []
    order = {"ancestor": 0, "offspring": 2}  # the start, the partners, what the run hands on
    for (owner, policy), cells in sorted(finals.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 1))):
        tds = "".join(score_cell(cells.get(env), best[env]) for env in envs)
        gen = max(c.get("generation", 0) for c in cells.values())
        rows.append(f"<tr><td>{html.escape(owner)} <span class='muted'>{policy}, gen {gen}</span></td>{tds}</tr>")
    for key in ("random", "optimal"):
        value = {env: next((c[env].get(key) for c in finals.values() if env in c), None) for env in envs}
        rows.append(
            f"<tr><td class='muted'>{key} return</td>"
            + "".join(
                f"<td class='muted'>{value[e]:.2f}</td>" if value[e] is not None else "<td class='muted'>?</td>"
                for e in envs
            )
            + "</tr>"
        )
    return (
        f"<table><tr><th>policy</th>{head}</tr>{''.join(rows)}</table>"
        "<p class='cap'>Each cell: normalized return (1 optimal; 0 the random policy where it loses reward, "
        "else no reward), then (mean return, success rate) on the evaluation seeds.</p>"
    )


def best_of(values: list[float]) -> float | None:
    """Returns the value to mark in bold: the maximum, or None when every value ties (nothing stands out)."""
    return max(values) if values and max(values) > min(values) else None


def score_cell(e: Event | None, best: float | None) -> str:
    if e is None:
        return "<td class='muted'>–</td>"
    cls = " class='best'" if best is not None and e["normalized"] == best else ""
    return (
        f"<td{cls}>{e['normalized']:.2f} <span class='muted'>({e['mean_return']:.2f}, "
        f"{100 * e['success']:.0f}%)</span></td>"
    )


def warnings_html(events: list[Event]) -> str:
    """Returns the run's warnings and skipped distillations, folded away (they are context, not results)."""
    notes = [
        f"gen {e.get('generation')} round {e.get('round')} {e.get('partner')}: {e.get('message') or e.get('reason')}"
        for e in events
        if e["event"] in ("warning", "distill_skipped")
    ]
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f"<h2>Warnings</h2><details><summary>{len(notes)} warnings and skipped distillations</summary>"
        f"<ul style='font-size:13px'>{items}</ul></details>"
    )


# -- comparing a sweep ----------------------------------------------------------------------------------


def load_sweep(sweep_dir: str | Path) -> list[Run]:
    """Returns every run of a Hydra multirun directory (each subdirectory holding a metrics.jsonl)."""
    path = Path(sweep_dir)
    if not path.is_dir():
        raise ColearnError(f"sweep directory {str(path)!r} does not exist")
    runs = [load_run(p.parent) for p in sorted(path.glob("*/metrics.jsonl")) if p.stat().st_size]
    if not runs:
        raise ColearnError(f"{str(path)!r} has no runs (no */metrics.jsonl with events); is it a multirun dir?")
    return runs


def preset_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Returns runs grouped by preset: their overrides except seed= and those every run shares, so seeds
    are replicates of one preset (label "defaults" when nothing else varies)."""

    def varying(run: Run) -> list[str]:
        keys = [o for o in run.overrides if not o.split("=")[0].lstrip("+~").endswith("seed")]
        return sorted(
            (o for o in keys if not all(o in r.overrides for r in runs)),
            key=lambda o: (not o.startswith("experiment="), o),
        )

    groups: dict[str, list[Run]] = {}
    for run in runs:
        label = " ".join(o.removeprefix("experiment=") for o in varying(run)) or "defaults"
        groups.setdefault(label, []).append(run)
    return groups


def final_of(run: Run, owners: Callable[[str], bool]) -> dict[str, float]:
    """Returns {env: mean normalized return of the chosen owners' last evaluation} (main policy)."""
    policy = main_policy(run.events)
    values: dict[str, list[float]] = {}
    for (owner, pol), cells in final_scores(run.events).items():
        if pol == policy and owners(owner):
            for env, e in cells.items():
                values.setdefault(env, []).append(e["normalized"])
    return {env: sum(v) / len(v) for env, v in values.items()}


def partner_curve(run: Run) -> dict[str, dict[tuple[int, int], tuple[float, float]]]:
    """Returns {env: {(generation, round): (env steps, mean normalized return over partners)}}, starting
    at (0, -1) with the ancestor's score before any learning when the run logged it."""
    policy = main_policy(run.events)
    acc: dict[str, dict[tuple[int, int], list[tuple[float, float]]]] = {}
    for e in plots.of(run.events, "eval"):
        if e["policy"] == policy and e["partner"] != "offspring":
            key = (e["generation"], -1 if e["partner"] == "ancestor" else e["round"])
            acc.setdefault(e["env"], {}).setdefault(key, []).append((e["step"], e["normalized"]))
    return {
        env: {k: (pts[0][0], sum(v for _, v in pts) / len(pts)) for k, pts in per.items()} for env, per in acc.items()
    }


def preset_curves(runs: list[Run]) -> dict[str, list[tuple[float, float, float]]]:
    """Returns {env: [(mean steps, mean return, 95% half-width)]} over the seeds of one preset, at the
    (generation, round) points every seed evaluated."""
    curves = [partner_curve(r) for r in runs]
    out = {}
    for env in dict.fromkeys(env for c in curves for env in c):
        keys = sorted(set.intersection(*(set(c.get(env, {})) for c in curves)))
        points = []
        for k in keys:
            mean, half = t_interval([c[env][k][1] for c in curves])
            points.append((sum(c[env][k][0] for c in curves) / len(curves), mean, 0.0 if math.isnan(half) else half))
        out[env] = points
    return out


Stats = dict[str, dict[str, tuple[float, float]]]  # {preset: {column: (mean, 95% half-width)}}


def preset_stats(groups: dict[str, list[Run]], owners: Callable[[str], bool]) -> tuple[list[str], Stats]:
    """Returns the columns (each env, then "mean over envs") and, per preset, each column's mean over seeds
    of the final normalized return with the 95% t-interval half-width (NaN with one seed)."""
    finals = {label: [final_of(r, owners) for r in runs] for label, runs in groups.items()}
    envs = list(dict.fromkeys(env for fs in finals.values() for f in fs for env in f))
    for fs in finals.values():
        for f in fs:
            f["mean over envs"] = sum(f[e] for e in envs if e in f) / max(sum(e in f for e in envs), 1)
    cols = envs + ["mean over envs"]
    return cols, {
        label: {c: t_interval([f[c] for f in fs if c in f]) for c in cols if any(c in f for f in fs)}
        for label, fs in finals.items()
    }


def compare_table_html(groups: dict[str, list[Run]], owners: Callable[[str], bool]) -> str:
    """Returns a table: one row per preset, one column per env (and their mean), each cell the mean over
    seeds of the final normalized return ± the 95% t-interval half-width."""
    cols, stats = preset_stats(groups, owners)
    best = {c: best_of([s[c][0] for s in stats.values() if c in s]) for c in cols}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for label, s in stats.items():
        cells = "".join(interval_cell(s.get(c), best[c]) for c in cols)
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{len(groups[label])}</td>{cells}</tr>")
    return f"<table><tr><th>preset</th><th>seeds</th>{head}</tr>{''.join(rows)}</table>"


def compare_table_text(groups: dict[str, list[Run]], owners: Callable[[str], bool]) -> str:
    """Returns `compare_table_html`'s table in fixed-width text: each cell `mean ± half-width` (`± –` with
    one seed, `–` where the preset has no score)."""
    cols, stats = preset_stats(groups, owners)
    cell = {label: [text_cell(s.get(c)) for c in cols] for label, s in stats.items()}
    first = max(len("preset"), *(len(label) for label in stats))
    widths = [max(len(c), *(len(cells[i]) for cells in cell.values())) for i, c in enumerate(cols)]
    header = f"{'preset':<{first}}  seeds" + "".join(f"  {c:>{w}}" for c, w in zip(cols, widths))
    lines = [header, "-" * len(header)]
    for label, cells in cell.items():
        values = "".join(f"  {v:>{w}}" for v, w in zip(cells, widths))
        lines.append(f"{label:<{first}}  {len(groups[label]):>5}{values}")
    return "\n".join(lines)


def text_cell(stat: tuple[float, float] | None) -> str:
    if stat is None:
        return "–"
    mean, half = stat
    return f"{mean:.2f} ± " + ("–" if math.isnan(half) else f"{half:.2f}")


def interval_cell(stat: tuple[float, float] | None, best: float | None) -> str:
    if stat is None:
        return "<td class='muted'>–</td>"
    mean, half = stat
    cls = " class='best'" if best is not None and mean == best else ""
    band = "<span class='muted'>± –</span>" if math.isnan(half) else f"<span class='muted'>± {half:.2f}</span>"
    return f"<td{cls}>{mean:.2f} {band}</td>"


def write_compare(sweep_dir: str | Path, groups: dict[str, list[Run]] | None = None) -> Path:
    """Writes SWEEP_DIR/compare.html (and compare_returns.png) for the sweep's runs grouped by preset
    (`preset_groups`, unless given); returns the HTML path."""
    path = Path(sweep_dir)
    groups = groups or preset_groups(load_sweep(path))
    shared = sorted(set.intersection(*(set(r.overrides) for rs in groups.values() for r in rs)))
    parts = [
        f"<h1>colearn sweep <code>{html.escape(path.name)}</code></h1>",
        f'<p class="sub">{html.escape(str(path.resolve()))}<br>{sum(map(len, groups.values()))} runs; '
        f"shared overrides: {html.escape(' '.join(shared) or 'none')}</p>",
        "<h2>Final offspring</h2><p class='cap'>The last generation's offspring (what a run hands on): "
        "normalized return, mean over seeds ± 95% t-interval half-width (– with one seed).</p>",
        compare_table_html(groups, lambda owner: owner == "offspring"),
        "<h2>Final partners</h2><p class='cap'>Mean over partners of their last evaluation.</p>",
        compare_table_html(groups, lambda owner: owner not in plots.FIXED),
    ]
    curves = {label: preset_curves(runs) for label, runs in groups.items()}
    evals = [e for rs in groups.values() for r in rs for e in plots.of(r.events, "eval")]
    fig = plots.sweep_figure(curves, plots.has_ceiling(evals))
    if fig is not None:
        parts += [
            "<h2>Return against environment steps</h2><p class='cap'>Partners' mean normalized return "
            "per preset; band: 95% t-interval over seeds.</p>",
            embedded_png(fig, path / "compare_returns.png", "return against environment steps"),
        ]
    out = path / "compare.html"
    out.write_text(page(f"colearn sweep {path.name}", parts), encoding="utf-8")
    return out
