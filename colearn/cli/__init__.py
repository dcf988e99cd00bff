"""The `colearn` command: the Hydra main that runs an experiment, and the subcommands on finished runs and checkpoints.

    main.py        the console script: dispatches `colearn <subcommand>`, else the Hydra main (each imported when used)
    __main__.py    `python -m colearn.cli`
    console.py     one-line user errors (exit 2), logs above progress bars, the libraries' progress bars silenced
    experiment.py  the Hydra main: conf/ composed into a Config, checked, run by the loop; sweep directory names
    resume.py      `colearn resume RUN_DIR`: continue from the newest intact checkpoint
    export.py      `colearn export RUN_DIR OUT`: a deployable Hugging Face directory with a model card
    report.py      `colearn report RUN_DIR`, `colearn compare SWEEP_DIR`
    merge.py       `colearn merge`: checkpoints on disk merged by a recipe (colearn's or mergekit's), or searched

Light where it must be: `colearn merge` imports main, console and merge, none of which loads transformers,
gymnasium, datasets or Hydra (its --search loads what acting needs when it runs).

May import: config, errors, models, experience, learning, rundir, merging, breeding, analysis, loop.
"""
