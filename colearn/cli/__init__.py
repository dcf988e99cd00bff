"""The `colearn` command: the Hydra main that runs an experiment, and the subcommands on finished runs and checkpoints.

    main.py        the console entry point: dispatches to a subcommand, else to the Hydra main
    __main__.py    `python -m colearn.cli`

May import: anything in colearn (it sits on top).
"""
