"""The table printed at the end of a run: each policy's score per env between the random floor and the optimal
ceiling."""

from __future__ import annotations

from colearn.experience.evaluate import EnvScore


def summary_table(scores: dict[str, list[EnvScore]]) -> str:
    """Returns a fixed-width table: one row per (policy owner, evaluated policy), one column per env,
    each cell `mean return (normalized)` (`evaluate.normalized_return`), then a row with each env's
    random-policy return and a last row with its optimal return."""
    envs = list(dict.fromkeys(s.env for ss in scores.values() for s in ss))
    width = max([10, *(len(e) + 2 for e in envs)])
    header = f"{'policy':<22}" + "".join(f"{e:>{width + 8}}" for e in envs)
    lines = [header, "-" * len(header)]
    for owner, ss in scores.items():
        for kind in dict.fromkeys(s.policy for s in ss):
            cells = {s.env: s for s in ss if s.policy == kind}
            row = "".join(
                f"{cells[e].mean_return:>{width}.2f} ({cells[e].normalized:4.2f})" if e in cells else " " * (width + 8)
                for e in envs
            )
            lines.append(f"{owner + ' ' + kind:<22}" + row)
    for name in ("random", "optimal"):
        value = {s.env: getattr(s, name) for ss in scores.values() for s in ss}
        lines.append(
            f"{name:<22}"
            + "".join(
                f"{value[e]:>{width}.2f}        " if value[e] is not None else f"{'?':>{width}}        " for e in envs
            )
        )
    return "\n".join(lines)
