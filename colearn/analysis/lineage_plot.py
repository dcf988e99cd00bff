"""The report's lineage figure: who descends from whom, laid out in boxes that never overlap.

`lineage_layout` places the boxes (inches from the figure's bottom left) from their text's measured size:
generations left to right (ancestor, then each generation's partners and offspring), wrapped onto further
rows when a row would grow wider than the page; each further row starts with its generation's ancestor,
the offspring that ended the row above. `lineage_figure` draws that layout.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyBboxPatch

from colearn.analysis.plots import plt

FONT_SIZE = 8.5  # points
PAD = 0.09  # inches of box around its text
COLUMN_GAP = 0.42  # inches between columns: room for the arrows
PARTNER_GAP = 0.16  # inches between the partner boxes of one generation
ROW_GAP = 0.45  # inches between wrapped rows
MARGIN = 0.12  # inches around everything
TITLE_HEIGHT = 0.35  # inches above the boxes for the title
MAX_WIDTH = 11.5  # inches: the report page's width
METHOD_WIDTH = 24  # characters: a longer "how it was made" line wraps
TITLE = "Lineage (box color: mean normalized return, red 0 → green optimal; offspring: merge gain in brackets)"
TITLE_SIZE = 10  # points


@dataclass(frozen=True)
class Box:
    """One lineage node drawn as a box: center (x, y) and size in inches, its text and its score."""

    key: str  # e.g. "gen1/A", "gen1/offspring", "gen2/ancestor"
    x: float
    y: float
    width: float
    height: float
    text: str
    score: float | None  # mean normalized return: the box's color

    @property
    def left(self) -> float:
        return self.x - self.width / 2

    @property
    def right(self) -> float:
        return self.x + self.width / 2

    @property
    def bottom(self) -> float:
        return self.y - self.height / 2

    @property
    def top(self) -> float:
        return self.y + self.height / 2


@dataclass
class LineageLayout:
    """Every box and arrow of a lineage figure, in a `width` x `height` inch canvas."""

    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    arrows: list[tuple[str, str]] = field(default_factory=list)  # (from box key, to box key)

    def box(self, key: str) -> Box:
        return next(b for b in self.boxes if b.key == key)


@lru_cache(maxsize=1)
def _renderer() -> RendererAgg:
    return RendererAgg(1, 1, 72)  # one pixel a point


def text_size(text: str, fontsize: float = FONT_SIZE, weight: str = "normal") -> tuple[float, float]:
    """Returns (width, height) in inches of `text` drawn by matplotlib at `fontsize` points (line spacing 1.2),
    measured with its own font metrics, slightly generously."""
    prop = FontProperties(size=fontsize, weight=weight)
    lines = text.split("\n")
    width = max(_renderer().get_text_width_height_descent(line or " ", prop, ismath=False)[0] for line in lines)
    _, line_height, _ = _renderer().get_text_width_height_descent("lp", prop, ismath=False)
    return width / 72, 1.2 * line_height * len(lines) / 72


def mean_or_none(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def score_lines(scores: dict[str, float], gains: dict[str, float] | None = None) -> str:
    return "\n".join(
        f"{env} {v:.2f}" + (f" ({gains[env]:+.2f})" if gains and env in gains else "") for env, v in scores.items()
    )


def how_made(recipe: dict[str, Any]) -> str:
    """Returns one line saying how an offspring was made: the merge method, whose copy it is, what a mixture
    routes (merge.fallback=cluster: which clusters were merged and which partners routed alone), and why, and a
    failed promotion gate."""
    method = recipe.get("method", "?")
    made = f"copy of {recipe['source']}" if method == "copy_best" and "source" in recipe else method
    if recipe.get("fallback") == "mixture":
        made = f"mixture of {', '.join(dict.fromkeys(recipe.get('mixture', {}).values()))}"
    if "clusters" in recipe:
        merged = [c["name"] for c in recipe["clusters"] if c["outcome"] == "merged"]
        alone = [n for c in recipe["clusters"] if c["outcome"] != "merged" for n in c["members"]]
        made = "clusters: " + "; ".join(
            [f"{', '.join(merged)} merged"] * bool(merged) + [f"{', '.join(alone)} routed"] * bool(alone)
        )
    if recipe.get("outcome") not in (None, "merged", "copy"):
        made += f" ({recipe['outcome']})"
    if recipe.get("gate", {}).get("passed") is False:
        made += ", gate failed"
    return made


Node = tuple[str, str, float | None]  # (box key, text, score)
Generation = tuple[list[Node], Node]  # a generation's partners and its offspring


def node_boxes(node: dict[str, Any]) -> Generation:
    """Returns the (key, text, score) of a lineage node's partner boxes and of its offspring box."""
    g = node["generation"]
    partners = []
    for pid in node.get("parents", []):
        name = pid.split("/")[-1]
        scores = node.get("parent_scores", {}).get(name, {})
        partners.append(
            (f"gen{g}/{name}", f"{name} · gen {g}\n{score_lines(scores)}".rstrip("\n"), mean_or_none(scores))
        )
    scores = node.get("scores", {})
    made = textwrap.fill(how_made(node.get("recipe", {})), METHOD_WIDTH)
    text = f"offspring · gen {g}\n{made}\n{score_lines(scores, node.get('merge_gain'))}"
    return partners, (f"gen{g}/offspring", text.rstrip("\n"), mean_or_none(scores))


def sized(text: str) -> tuple[float, float]:
    """Returns (width, height) in inches of the box around `text`."""
    w, h = text_size(text)
    return w + 2 * PAD, h + 2 * PAD


def column_size(partners: list[Node]) -> tuple[float, float]:
    """Returns (width, height) in inches of a generation's column of partner boxes."""
    sizes = [sized(text) for _, text, _ in partners]
    return max((w for w, _ in sizes), default=0.0), sum(h for _, h in sizes) + PARTNER_GAP * max(len(sizes) - 1, 0)


def lineage_layout(lineage: list[dict[str, Any]], max_width: float = MAX_WIDTH) -> LineageLayout:
    """Returns the boxes and arrows of the lineage figure: per row an ancestor box, then for each generation a
    column of partner boxes and the offspring box, columns `COLUMN_GAP` apart; a generation that would make
    its row wider than `max_width` inches starts a new row (a row holds at least one generation)."""
    rows: list[tuple[Node, list[Generation]]] = []
    width_now = 0.0
    ancestor: Node = ("gen0/ancestor", "ancestor\ngen 0", None)
    for node in lineage:
        partners, child = node_boxes(node)
        gen_width = 2 * COLUMN_GAP + column_size(partners)[0] + sized(child[1])[0]
        if not rows or width_now + gen_width > max_width - 2 * MARGIN:
            rows.append((ancestor, []))
            width_now = sized(ancestor[1])[0]
        rows[-1][1].append((partners, child))
        width_now += gen_width
        g = node["generation"] + 1
        ancestor = (f"gen{g}/ancestor", f"ancestor · gen {g}\n= offspring of gen {g - 1}", child[2])
    layout = LineageLayout(0.0, 0.0)
    bottom = 0.0  # rows go downwards from 0; shifted up into the canvas at the end
    for start, generations in rows:
        bottom = place_row(layout, start, generations, bottom - ROW_GAP if layout.boxes else 0.0)
    layout.boxes = [Box(b.key, b.x, b.y - bottom + MARGIN, b.width, b.height, b.text, b.score) for b in layout.boxes]
    title_width = text_size(TITLE, TITLE_SIZE, "bold")[0]
    layout.width = max(max((b.right for b in layout.boxes), default=0.0), title_width) + MARGIN
    layout.height = max((b.top for b in layout.boxes), default=0.0) + MARGIN + TITLE_HEIGHT
    return layout


def place_row(layout: LineageLayout, ancestor: Node, generations: list[Generation], top: float) -> float:
    """Adds one row's boxes and arrows below `top` (inches, growing upwards); returns the row's bottom."""
    heights = [sized(ancestor[1])[1]]
    for partners, child in generations:
        heights += [column_size(partners)[1], sized(child[1])[1]]
    middle = top - max(heights) / 2
    key, text, score = ancestor
    w, h = sized(text)
    layout.boxes.append(Box(key, MARGIN + w / 2, middle, w, h, text, score))
    before, right = key, MARGIN + w
    for partners, (child_key, child_text, child_score) in generations:
        column, column_height = column_size(partners)
        x, y = right + COLUMN_GAP + column / 2, middle + column_height / 2
        for pkey, ptext, pscore in partners:
            pw, ph = sized(ptext)
            layout.boxes.append(Box(pkey, x, y - ph / 2, pw, ph, ptext, pscore))
            layout.arrows += [(before, pkey), (pkey, child_key)]
            y -= ph + PARTNER_GAP
        cw, ch = sized(child_text)
        right = x + column / 2 + COLUMN_GAP
        layout.boxes.append(Box(child_key, right + cw / 2, middle, cw, ch, child_text, child_score))
        before, right = child_key, right + cw
    return top - max(heights)


def score_color(score: float | None) -> Any:
    """Box color of a lineage node: red (0) through yellow to green (optimal), white when unknown."""
    if score is None:
        return "white"
    r, g, b, _ = plt.cm.RdYlGn(0.1 + 0.8 * max(0.0, min(1.0, score)))
    return (0.55 + 0.45 * r, 0.55 + 0.45 * g, 0.55 + 0.45 * b)  # pastel, so labels stay readable


def lineage_figure(lineage: list[dict[str, Any]]) -> Figure | None:
    """The lineage tree as laid out by `lineage_layout`: ancestor -> partners -> offspring (the next ancestor),
    each box labelled with its normalized return per env (offspring: and its merge gain)."""
    if not lineage:
        return None
    layout = lineage_layout(lineage)
    fig = plt.figure(figsize=(layout.width, layout.height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, layout.width)
    ax.set_ylim(0, layout.height)
    for b in layout.boxes:
        ax.add_patch(
            FancyBboxPatch(
                (b.left, b.bottom),
                b.width,
                b.height,
                boxstyle="round,pad=0,rounding_size=0.06",
                facecolor=score_color(b.score),
                edgecolor="0.35",
                linewidth=1,
            )
        )
        ax.text(
            b.x,
            b.y,
            b.text,
            ha="center",
            va="center",
            multialignment="center",
            fontsize=FONT_SIZE,
            parse_math=False,
            gid=b.key,
        )
    for source, target in layout.arrows:
        s, t = layout.box(source), layout.box(target)
        ax.annotate(
            "",
            xy=(t.left, t.y),
            xytext=(s.right, s.y),
            arrowprops=dict(arrowstyle="-|>", color="0.35", shrinkA=1, shrinkB=1, lw=1.1),
        )
    ax.text(
        layout.width / 2,
        layout.height - MARGIN,
        TITLE,
        ha="center",
        va="top",
        fontsize=TITLE_SIZE,
        fontweight="bold",
        parse_math=False,
    )
    return fig
