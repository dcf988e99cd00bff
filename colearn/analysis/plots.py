"""The report's plots: one function per figure, each taking plain data (metrics events, lineage nodes)
and returning a matplotlib Figure, or None when the run has nothing to show for it.

Conventions shared by every figure: one color per policy owner (partners in order, then offspring and
the integration modes), greedy evaluation as solid lines, sampled as dotted, the optimal return as a
grey dashed line at 1 (returns are normalized: `evaluate.normalized_return`). Where one panel holds several
envs of a partner, each env has its own line style and marker (`ENV_STYLES`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Event = dict[str, Any]
PALETTE = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
FIXED = {"offspring": "#2ca02c", "ancestor": "#7f7f7f"}
ENV_COLORS = ["#17becf", "#9467bd", "#bcbd22", "#e377c2", "#8c564b"]  # envs: apart from the partners' colors
ENV_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1, 1, 1)), "v")]  # (line, marker)
CEILING = dict(color="0.45", linestyle="--", linewidth=1.2)
REJECTED = "#d62728"  # a merge the promotion gate refused
plt.rcParams.update(
    {
        "figure.dpi": 100,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titleweight": "bold",
        "font.size": 10,
    }
)


def colors_for(names: list[str]) -> dict[str, str]:
    """Returns a stable color per name: offspring green, ancestor grey, the rest from PALETTE in order."""
    rest = iter(PALETTE * 4)
    return {n: FIXED.get(n) or next(rest) for n in dict.fromkeys(names)}


def of(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.get("event") == kind]


def envs_of(events: list[Event]) -> list[str]:
    return list(dict.fromkeys(e["env"] for e in of(events, "eval")))


def has_ceiling(evals: list[Event]) -> bool:
    """True when every score here was normalized against a known optimal return above its floor
    (`evaluate.normalized_return`), so 1.0 is the optimum."""
    return all(e.get("optimal") is not None and e["optimal"] > min(e.get("random") or 0.0, 0.0) for e in evals)


def merge_steps(events: list[Event]) -> list[tuple[int, int]]:
    """Returns (env step, generation) of each merge: where one generation hands over to the next."""
    return [(e["step"], e["generation"]) for e in of(events, "merge")]


def mark_merges(ax, merges: list[tuple[int, int]]) -> None:
    for step, gen in merges:
        ax.axvline(step, color="0.85", linewidth=1, zorder=0)
        ax.text(
            step, 1.0, f" merge {gen}", transform=ax.get_xaxis_transform(), fontsize=8, color="0.5", va="top", ha="left"
        )


def returns_figure(events: list[Event]) -> Figure | None:
    """Normalized return against environment steps: one panel per env, one color per partner, greedy
    solid and sampled dotted, starting from the ancestor's score (grey diamond: chance level before any
    learning); each generation's offspring a star; the optimal return dashed."""
    evals = of(events, "eval")
    if not evals:
        return None
    envs = envs_of(events)
    partners = [o for o in dict.fromkeys(e["partner"] for e in evals) if o not in FIXED]
    colors = colors_for(partners + list(FIXED))
    fig, axes = plt.subplots(1, len(envs), figsize=(min(5.2 * len(envs), 10.5), 3.6), squeeze=False, sharey=True)
    # earlier partners drawn wider, so identical curves (e.g. two partners both at 0) stay visible
    widths = {o: 1.5 + 1.5 * (len(partners) - 1 - i) / max(len(partners) - 1, 1) for i, o in enumerate(partners)}
    for ax, env in zip(axes[0], envs):
        here = [e for e in evals if e["env"] == env]
        for policy, style in (("greedy", "-"), ("sampled", ":")):
            start = points(here, "ancestor", policy)[:1]  # every partner of generation 0 starts as the ancestor
            for owner in partners:
                pts = points(here, owner, policy)
                if pts:
                    xs, ys = zip(*(start + pts))
                    ax.plot(
                        xs,
                        ys,
                        style,
                        marker="o",
                        markersize=2 + widths[owner],
                        linewidth=widths[owner],
                        color=colors[owner],
                        label=f"{owner} {policy}",
                    )
            faint = 1 if policy == "greedy" else 0.45
            for owner, marker, size in (("ancestor", "D", 45), ("offspring", "*", 150)):
                pts = points(here, owner, policy)
                if pts:
                    ax.scatter(
                        *zip(*pts),
                        marker=marker,
                        s=size if policy == "greedy" else size / 2,
                        color=colors[owner],
                        zorder=3,
                        alpha=faint,
                        label=f"{owner} {policy}",
                    )
        if has_ceiling(here):
            ax.axhline(1.0, **CEILING, label="optimal")
        mark_merges(ax, merge_steps(events))
        actors = sorted({e["partner"] for e in here if e.get("own_env")} - set(FIXED))
        ax.set_title(env + (f" (acted in by {', '.join(actors)})" if actors else " (no partner acts here)"))
        ax.set_xlabel("environment steps")
    axes[0][0].set_ylabel("normalized return" if has_ceiling(evals) else "mean return")
    axes[0][0].set_ylim(min(-0.05, axes[0][0].get_ylim()[0]), max(1.1, axes[0][0].get_ylim()[1]))
    legend_right(fig, axes[0][-1])
    return fig


def points(evals: list[Event], owner: str, policy: str) -> list[tuple[int, float]]:
    """Returns (env steps, normalized return) of one policy owner's evaluations, in logged order."""
    return [(e["step"], e["normalized"]) for e in evals if e["partner"] == owner and e["policy"] == policy]


def legend_right(fig: Figure, ax) -> None:
    """One legend for the figure, outside the last panel, so no curve hides behind it."""
    handles, labels = [], []
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)
    # the panels are laid out without the legend (a tall one cannot fit beside them); saving with
    # bbox_inches="tight" takes it in, once it counts again
    legend.set_in_layout(False)
    fig.tight_layout()
    legend.set_in_layout(True)


@dataclass
class MergeGain:
    """What one generation's merge gained: the merged model's normalized return minus its better parent's."""

    generation: int
    method: str  # the merge operator (for a merge the gate refused: the one it refused)
    status: str  # "promoted", "ungated" (merge.gate off), "rejected" (by the gate) or "not merged"
    by_env: dict[str, float] = field(default_factory=dict)  # per env on the evaluation seeds: merged offspring only
    validation: float | None = None  # the gate's measure: mean over envs on its validation episodes
    note: str = ""  # why there was no merge


def merge_gains(events: list[Event]) -> list[MergeGain]:
    """Returns each merge event's gain. A promoted or ungated merge is the offspring, so its per-env gains are
    the offspring's; a merge the gate refused has only the gate's validation gain (the offspring then is a
    fallback, whose gain is not the merge's); a generation that never merged (incompatible partners, merging
    off) has none."""
    out = []
    for e in of(events, "merge"):
        recipe = e.get("recipe") if isinstance(e.get("recipe"), dict) else {}
        gate = recipe.get("gate") or {}
        checked = isinstance(gate.get("offspring"), (int, float)) and isinstance(gate.get("best_parent"), (int, float))
        validation = gate["offspring"] - gate["best_parent"] if checked else None
        by_env = {k.removeprefix("merge/gain/"): v for k, v in e.items() if k.startswith("merge/gain/")}
        outcome = recipe.get("outcome", "merged" if e.get("promoted", True) else "fallback")
        if "attempted" in recipe:
            attempted = recipe["attempted"]
            out.append(MergeGain(e["generation"], attempted.get("method", "?"), "rejected", validation=validation))
        elif outcome == "merged" or "clusters" in recipe:  # merge.fallback=cluster: the routed cluster merges
            status = "promoted" if checked else "ungated"
            out.append(MergeGain(e["generation"], str(e.get("method", "?")), status, by_env, validation))
        else:
            note = "partners incompatible" if outcome == "fallback" else "merging off"
            out.append(MergeGain(e["generation"], str(e.get("method", "")), "not merged", note=note))
    return out


def merge_gain_figure(events: list[Event]) -> Figure | None:
    """Merge gain per generation: the merged model's normalized return minus its better parent's, per env on the
    evaluation seeds for a merge that became the offspring, and the gate's gain (mean over envs, validation
    episodes) for every gated merge, red and hatched where the gate refused it."""
    gains = merge_gains(events)
    if not gains:
        return None
    envs = list(dict.fromkeys(env for g in gains for env in g.by_env))
    slots = len(envs) + any(g.validation is not None for g in gains)
    fig, ax = plt.subplots(figsize=(min(max(4.5, 1.0 * len(gains) * slots + 2.5), 10.5), 3.4))
    width = 0.8 / max(slots, 1)
    offset = lambda j: (j - (slots - 1) / 2) * width  # noqa: E731 - x offset of slot j within a generation
    for j, env in enumerate(envs):
        here = [(i, g.by_env[env]) for i, g in enumerate(gains) if env in g.by_env]
        if here:
            bars = ax.bar(
                [i + offset(j) for i, _ in here],
                [v for _, v in here],
                width * 0.95,
                color=ENV_COLORS[j % len(ENV_COLORS)],
                label=env,
            )
            ax.bar_label(bars, gain_labels([v for _, v in here]), fontsize=8, padding=2)
    for status, style in (
        ("promoted", dict(color="0.45", label="all envs, gate's validation episodes")),
        (
            "rejected",
            dict(
                color="white",
                edgecolor=REJECTED,
                hatch="//",
                linewidth=1.2,
                label="merge the gate rejected (validation episodes)",
            ),
        ),
    ):
        here = [(i, g.validation) for i, g in enumerate(gains) if g.status == status and g.validation is not None]
        if here:
            bars = ax.bar([i + offset(slots - 1) for i, _ in here], [v for _, v in here], width * 0.95, **style)
            ax.bar_label(
                bars,
                gain_labels([v for _, v in here]),
                fontsize=8,
                padding=2,
                color=REJECTED if status == "rejected" else "k",
            )
    for i, g in enumerate(gains):
        if g.status == "not merged":
            ax.text(i, 0, f"no merge\n({g.note})", ha="center", va="bottom", fontsize=8, color="0.4")
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(
        range(len(gains)),
        [f"gen {g.generation}\n{g.method}" + ("\nrejected" if g.status == "rejected" else "") for g in gains],
    )
    for tick, g in zip(ax.get_xticklabels(), gains):
        if g.status == "rejected":
            tick.set_color(REJECTED)
    ax.set_ylabel("merged − best parent\n(normalized return)")
    ax.set_title("Merge gain per generation (above 0: the merge beat both parents)")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, -0.1) * 1.2, max(hi, 0.1) * 1.2)  # a zero gain reads as zero, not as noise at 1e-17
    legend_right(fig, ax)
    return fig


def gain_labels(values: list[float]) -> list[str]:
    """Returns bar labels: signed to two decimals, a bare 0 for no gain (neighbouring bars' labels fit)."""
    return [f"{v:+.2f}" if round(v, 2) else "0" for v in values]


COMPAT_PANELS = [
    ("compat/cka/", "representation similarity (linear CKA)"),
    ("compat/cosine/", "task-vector cosine"),
    ("compat/sign_conflict/", "sign-conflict rate"),
    ("weights/distance/", "weight distance (L2)"),
]


def compat_figure(events: list[Event]) -> Figure | None:
    """Compatibility over time: one panel per measure (CKA, task-vector cosine, sign conflicts, weight
    distance), one line per pair, from whichever events carry `compat/*` and `weights/distance/*`."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in events:
        for k, v in e.items():
            if k.startswith(("compat/", "weights/distance/")) and isinstance(v, (int, float)):
                series[k].append((e["step"], v))
    panels = [(p, t) for p, t in COMPAT_PANELS if any(k.startswith(p) for k in series)]
    if not panels:
        return None
    cols = min(len(panels), 2)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    colors = colors_for([o for o in dict.fromkeys(e["partner"] for e in of(events, "eval")) if o not in FIXED])
    for ax, (prefix, title) in zip(axes.flat, panels):
        for key in sorted(k for k in series if k.startswith(prefix)):
            label, style = compat_line(key.removeprefix(prefix), colors)
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, **{"marker": "o", "markersize": 3.5, **style}, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.legend(frameon=False, fontsize=8)
        mark_merges(ax, merge_steps(events))
    fig.tight_layout()
    return fig


def compat_line(pair: str, colors: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Returns (label, line style) of a compatibility series: a partner against its ancestor (`A~ancestor`, or
    `A` for a distance from it) solid in the partner's color; the pair of two partners in black; with more
    partners, a pair A~B in A's color with B's line style and marker (`ENV_STYLES`, in partner order), so every
    pair of a population has its own line."""
    a, _, b = pair.partition("~")
    if b in ("", "ancestor"):
        return f"{a} ~ ancestor", {"color": colors.get(a, "0.5")}
    if len(colors) <= 2:
        return f"{a} ~ {b}", {"color": "black"}
    line, marker = ENV_STYLES[list(colors).index(b) % len(ENV_STYLES)] if b in colors else ENV_STYLES[0]
    return f"{a} ~ {b}", {"color": colors.get(a, "0.5"), "linestyle": line, "marker": marker}


def modes_figure(events: list[Event]) -> Figure | None:
    """Integration modes side by side with the partners alone and the merged offspring: one panel per env,
    one horizontal bar per policy, at the last generation that evaluated modes (greedy when evaluated)."""
    modes = of(events, "integrate")
    if not modes:
        return None
    gen = max(e.get("generation", 0) for e in modes)
    policy = "greedy" if any(e["policy"] == "greedy" for e in modes) else "sampled"
    singles = last_scores_at([e for e in of(events, "eval") if e["partner"] != "ancestor"], gen, policy)
    mixed: dict[str, dict[str, float]] = {}
    for e in modes:
        if e.get("generation", 0) == gen and e["policy"] == policy:
            mixed.setdefault(e["mode"], {})[e["env"]] = e["normalized"]
    rows = {**singles, **mixed}
    labels = list(rows)[::-1]  # barh draws bottom-up: keep partners on top
    envs = list(dict.fromkeys(env for scores in mixed.values() for env in scores))
    colors = colors_for(list(singles) + ["mode"])
    fig, axes = plt.subplots(
        1, len(envs), figsize=(min(4.6 * len(envs), 11.5), 0.9 + 0.3 * len(rows)), squeeze=False, sharey=True
    )
    for ax, env in zip(axes[0], envs):
        values = [rows[label].get(env, float("nan")) for label in labels]
        bars = ax.barh(
            range(len(labels)),
            values,
            height=0.7,
            color=[colors.get(label, "#8da0cb") if label in singles else "#8da0cb" for label in labels],
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
        if has_ceiling([e for e in modes if e["env"] == env]):
            ax.axvline(1.0, **CEILING)
        ax.set_xlim(0, max(1.15, max((v for v in values if v == v), default=0) * 1.15))
        ax.set_title(env, fontsize=10)
        ax.set_xlabel("normalized return")
    axes[0][0].set_yticks(range(len(labels)), [lab if lab in singles else f"{lab} (mode)" for lab in labels])
    fig.suptitle(
        f"Partners alone, merged (offspring) and integrated (modes), generation {gen}, {policy}",
        fontsize=10,
        fontweight="bold",
    )
    fig.tight_layout()
    return fig


def last_scores_at(evals: list[Event], gen: int, policy: str) -> dict[str, dict[str, float]]:
    """Returns {owner: {env: normalized}} of each owner's last evaluation in generation `gen`."""
    out: dict[str, dict[str, float]] = {}
    for e in evals:  # events are in time order: later ones overwrite
        if e.get("generation") == gen and e["policy"] == policy:
            out.setdefault(e["partner"], {})[e["env"]] = e["normalized"]
    return out


def sweep_figure(curves: dict[str, dict[str, list[tuple[float, float, float]]]], ceiling: bool) -> Figure | None:
    """Return against environment steps for every preset of a sweep: {preset: {env: [(steps, mean,
    half-width of the 95% interval)]}}, one panel per env, mean line and interval band per preset."""
    envs = list(dict.fromkeys(env for per_env in curves.values() for env in per_env))
    if not envs:
        return None
    colors = colors_for(list(curves))
    widths = {p: 1.5 + 1.5 * (len(curves) - 1 - i) / max(len(curves) - 1, 1) for i, p in enumerate(curves)}
    fig, axes = plt.subplots(1, len(envs), figsize=(min(5.2 * len(envs), 10.5), 3.6), squeeze=False, sharey=True)
    means = [y for per_env in curves.values() for points in per_env.values() for _, y, _ in points]
    # the means set the scale: with two or three seeds a t-interval is wide, and its band is cut at the axes
    low, high = min(0.0, *means), max(1.0 if ceiling else 0.0, *means)
    for ax, env in zip(axes[0], envs):
        for preset, per_env in curves.items():
            if env not in per_env:
                continue
            xs, ys, hw = zip(*per_env[env])
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=2 + widths[preset],
                linewidth=widths[preset],
                color=colors[preset],
                label=preset,
            )
            ax.fill_between(
                xs,
                [y - h for y, h in zip(ys, hw)],
                [y + h for y, h in zip(ys, hw)],
                color=colors[preset],
                alpha=0.18,
                linewidth=0,
            )
        if ceiling:
            ax.axhline(1.0, **CEILING, label="optimal")
        ax.set_title(env)
        ax.set_xlabel("environment steps (mean over seeds)")
        ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.05 * (high - low or 1))
    axes[0][0].set_ylabel("partners' normalized return\n(mean, 95% interval over seeds)")
    legend_right(fig, axes[0][-1])
    return fig


def transfer_figure(events: list[Event]) -> Figure | None:
    """Two panels from `dynamics` events: return on never-visited envs (transfer) and forgetting, one line
    per partner (its color) and env (its line style and marker)."""
    panels = [("transfer/unseen_return/", "return on envs never acted in"), ("forgetting/", "forgetting")]
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in of(events, "dynamics"):
        for k, v in e.items():
            if k.startswith(tuple(p for p, _ in panels)) and isinstance(v, (int, float)) and "/ancestor/" not in k:
                series[k].append((e["step"], v))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), squeeze=False)
    owners = sorted({k.split("/")[-2] for k in series})
    colors = colors_for(owners)
    envs = sorted({k.split("/")[-1] for k in series})
    # earlier owners drawn wider, so identical curves (e.g. both partners at 1 after a merge) stay visible
    widths = {o: 1.2 + 1.8 * (len(owners) - 1 - i) / max(len(owners) - 1, 1) for i, o in enumerate(owners)}
    for ax, (prefix, title) in zip(axes.flat, panels):
        for key in sorted(k for k in series if k.startswith(prefix)):
            partner, env = key.split("/")[-2:]
            line, marker = ENV_STYLES[envs.index(env) % len(ENV_STYLES)]
            xs, ys = zip(*series[key])
            ax.plot(
                xs,
                ys,
                linestyle=line,
                marker=marker,
                markersize=3 + widths[partner],
                linewidth=widths[partner],
                color=colors.get(partner, "0.5"),
                label=f"{partner} on {env}",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("normalized return")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=8)
        mark_merges(ax, merge_steps(events))
    fig.tight_layout()
    return fig


def search_figure(searches: dict[str, dict[str, Any]]) -> Figure | None:
    """The merge recipe search (merge=evolve, `colearn merge --search`): one panel per search record
    ({label: record with `curve` and optionally `heldout_uniform`, `heldout`}), the fitness of every
    candidate (points), the best so far (step line), the uniform recipe's fitness (evaluation 0, dashed)
    and, at the right edge, the uniform and the winning recipe re-scored on held-out episodes."""
    searches = {label: s for label, s in searches.items() if s.get("curve")}
    if not searches:
        return None
    cols = min(len(searches), 3)
    rows = -(-len(searches) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(min(4.0 * cols + 2.8, 12.5), 3.3 * rows), squeeze=False, sharey=True
    )  # + room for the legend on the right
    for ax in axes.flat[len(searches) :]:
        ax.set_axis_off()
    for ax, (label, record) in zip(axes.flat, searches.items()):
        search_panel(ax, record)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("evaluation")
    lo, hi = axes[0][0].get_ylim()  # shared: at least 0.2 tall, so equal scores read as equal, not as 1e-17 noise
    if hi - lo < 0.2:
        axes[0][0].set_ylim((lo + hi) / 2 - 0.1, (lo + hi) / 2 + 0.1)
    for row in axes:
        row[0].set_ylabel("mean normalized return\non search episodes")
    legend_right(fig, axes[0][-1])
    return fig


HELDOUT_MARKERS = [  # (search record key, marker, size, color, legend name, side of its value label)
    ("heldout_uniform", "D", 60, FIXED["ancestor"], "uniform recipe", -1),
    ("heldout", "*", 150, FIXED["offspring"], "best recipe", 1),
]


def search_panel(ax, record: dict[str, Any]) -> None:
    """Draws one search: candidates, best so far (the running maximum of their fitness), the uniform
    recipe's level and, in a column right of the last evaluation, the held-out scores."""
    xs = [int(c["evaluation"]) for c in record["curve"]]
    ys = [float(c["fitness"]) for c in record["curve"]]
    best = [max(ys[: i + 1]) for i in range(len(ys))]  # from the fitness itself, not trusting a stored field
    ax.axhline(ys[0], **CEILING, label="uniform recipe (evaluation 0)")
    ax.scatter(xs, ys, s=18, color=PALETTE[0], alpha=0.55, zorder=2, label="candidate")
    ax.step(xs, best, where="post", color=PALETTE[0], linewidth=2, zorder=3, label="best so far")
    right = xs[-1] + 0.5
    heldout = [m for m in HELDOUT_MARKERS if record.get(m[0]) is not None]
    if heldout:
        width = max(2.0, 0.22 * len(xs))  # wide enough for a value label on each side of the markers
        edge, right = right + width / 2, right + width
        ax.axvline(xs[-1] + 0.5, color="0.85", linewidth=1, zorder=0)
        ax.text(
            edge,
            0.02,
            "held-out",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.4",
            bbox=dict(facecolor="white", edgecolor="none", pad=1),
            zorder=2.5,
        )
    for key, marker, size, color, name, side in heldout:  # uniform's value on the left, the winner's on the right
        ax.scatter(
            [edge],
            [record[key]],
            marker=marker,
            s=size,
            color=color,
            edgecolor="black",
            linewidth=0.6,
            zorder=4,
            label=f"held-out: {name}",
        )
        ax.annotate(
            f"{record[key]:.2f}",
            (edge, record[key]),
            xytext=(9 * side, 0),
            textcoords="offset points",
            ha="left" if side > 0 else "right",
            va="center",
            fontsize=8,
        )
    ax.set_xlim(-0.5, right)
    ticks = MaxNLocator(integer=True, nbins=6).tick_values(0, xs[-1])
    ax.set_xticks([int(t) for t in ticks if 0 <= t <= xs[-1]])  # no number under the held-out column
