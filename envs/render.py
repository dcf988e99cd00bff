"""Text renderers: turn a discrete observation of a known env into a string.

A renderer is ``renderer(env, obs) -> str`` where ``env`` is the wrapped
gymnasium env (renderers read static layout from ``env.unwrapped``) and ``obs``
is the raw observation. ``RENDERERS`` maps unwrapped class names to renderers;
unknown classes fall back to ``render_generic``.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import gymnasium as gym

Renderer = Callable[[gym.Env, Any], str]

# Every character any renderer may emit; used as the Text space charset.
TEXT_CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"


def render_generic(env: gym.Env, obs: Any) -> str:
    """Return ``"state 17"`` for a Discrete obs or ``"state 3 1 0"`` for a tuple."""
    if isinstance(obs, tuple | list):
        return "state " + " ".join(str(int(x)) for x in obs)
    return f"state {int(obs)}"


def render_frozen_lake(env: gym.Env, obs: Any) -> str:
    """Return the map rows joined by newlines with the agent's cell shown as ``P``, then a line naming it.

    The start cell keeps its ``S`` once the agent has left it, e.g. the start
    observation of the 4x4 map is ``"PFFF\\nFHFH\\nFFFH\\nHFFG\\nP at row 0 col 0"``. The last line is
    there because a small model learning from reward alone tells states apart by the prompt's last tokens:
    without it, states whose maps differ only in where ``P`` sits got near-identical policies.
    """
    row, col = divmod(int(obs), env.unwrapped.ncol)
    return render_frozen_lake_map(env, obs) + f"\nP {_cell_text((row, col))}"


def render_frozen_lake_map(env: gym.Env, obs: Any) -> str:
    """Return only the map rows with the agent's cell shown as ``P`` (``render_frozen_lake`` without its last line)."""
    unwrapped = env.unwrapped
    rows = [[cell.decode() for cell in row] for row in unwrapped.desc]
    row, col = divmod(int(obs), unwrapped.ncol)
    rows[row][col] = "P"
    return "\n".join("".join(r) for r in rows)


def render_taxi(env: gym.Env, obs: Any) -> str:
    """Return a 5x5 grid plus one status line.

    Cells: ``T`` taxi, ``p`` waiting passenger, ``D`` destination, ``.`` empty
    (priority T > p > D when they share a cell); ``|`` between two cells is a
    wall, a space is open road. The last line always states where the taxi, passenger
    and destination are, so overlaps stay unambiguous (and the state is named at the prompt's end, as in
    `render_frozen_lake`), e.g. ``"taxi at row 2 col 1, passenger at row 0 col 4, destination at row 4 col 3"``
    or ``"taxi at row 0 col 0, passenger in taxi, destination at row 0 col 0"``.
    """
    unwrapped = env.unwrapped
    taxi_row, taxi_col, pass_idx, dest_idx = unwrapped.decode(int(obs))
    locs = unwrapped.locs
    in_taxi = pass_idx == len(locs)
    marks = {locs[dest_idx]: "D"}
    if not in_taxi:
        marks[locs[pass_idx]] = "p"
    marks[(taxi_row, taxi_col)] = "T"
    n_rows, n_cols = unwrapped.desc.shape[0] - 2, (unwrapped.desc.shape[1] - 1) // 2
    lines = []
    for r in range(n_rows):
        line = marks.get((r, 0), ".")
        for c in range(1, n_cols):
            # desc column 2*c is the border left of cell c: "|" wall, ":" open
            wall = unwrapped.desc[1 + r, 2 * c] == b"|"
            line += ("|" if wall else " ") + marks.get((r, c), ".")
        lines.append(line)
    where = "in taxi" if in_taxi else _cell_text(locs[pass_idx])
    taxi, destination = _cell_text((taxi_row, taxi_col)), _cell_text(locs[dest_idx])
    lines.append(f"taxi {taxi}, passenger {where}, destination {destination}")
    return "\n".join(lines)


def _cell_text(cell: tuple[int, int]) -> str:
    """Return ``"at row R col C"`` for a grid cell."""
    return f"at row {cell[0]} col {cell[1]}"


RENDERERS: dict[str, Renderer] = {
    "FrozenLakeEnv": render_frozen_lake,
    "TaxiEnv": render_taxi,
}


def renderer_for(env: gym.Env) -> Renderer:
    """Return the registered renderer for ``env``'s unwrapped class, else the generic one."""
    return RENDERERS.get(type(env.unwrapped).__name__, render_generic)
