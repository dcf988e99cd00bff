"""`colearn report RUN_DIR` and `colearn compare SWEEP_DIR`: the pages of `colearn.analysis.report`."""

from __future__ import annotations

import argparse

from colearn.analysis import plots
from colearn.analysis.report import compare_table_text, load_sweep, preset_groups, write_compare, write_report


def report_main(argv: list[str]) -> None:
    """`colearn report RUN_DIR`: writes RUN_DIR/report.html."""
    parser = argparse.ArgumentParser(prog="colearn report", description="Write RUN_DIR/report.html with plots.")
    parser.add_argument("run_dir", help="a run directory (contains metrics.jsonl)")
    args = parser.parse_args(argv)
    print(f"report: {write_report(args.run_dir)}")


def compare_main(argv: list[str]) -> None:
    """`colearn compare SWEEP_DIR`: prints the presets' final scores and writes SWEEP_DIR/compare.html."""
    parser = argparse.ArgumentParser(
        prog="colearn compare", description="Compare the presets of a Hydra multirun: SWEEP_DIR/compare.html."
    )
    parser.add_argument("sweep_dir", help="a multirun directory (one subdirectory per run)")
    args = parser.parse_args(argv)
    groups = preset_groups(load_sweep(args.sweep_dir))
    out = write_compare(args.sweep_dir, groups)
    print("final offspring: normalized return, mean over seeds ± 95% interval half-width")
    print(compare_table_text(groups, lambda owner: owner == "offspring"))
    print("\nfinal partners: mean over partners of their last evaluation")
    print(compare_table_text(groups, lambda owner: owner not in plots.FIXED))
    print(f"\ncompare: {out}")
