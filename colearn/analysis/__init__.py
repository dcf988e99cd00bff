"""What a person reads from a run: dynamics (compatibility, drift, transfer, forgetting), the end-of-run summary
table, and the HTML reports with their plots.

    dynamics.py      namespaced metrics of a round: compat/..., weights/distance/..., transfer/..., forgetting/...
    summary.py       the table printed at the end of a run
    report.py        `colearn report` and `colearn compare` pages (self-contained HTML and PNGs)
    plots.py         the report's figures; lineage_plot.py the lineage tree

May import: config, errors, models, experience, breeding, rundir.
"""
