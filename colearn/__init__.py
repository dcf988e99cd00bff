"""colearn: language models that learn by experience from each other.

The subpackages are the stages of the data flow, in this order; each imports only stages above it, as its
`__init__` docstring declares in a "May import:" line (tests/test_layout.py holds the code to it):

    config.py, errors.py   the dataclass schema (checked at composition) and the one user-error type; imported by all
    models/                build or load a causal LM and tokenizer; the policy over actions; a Partner; its weights
    experience/            rollouts in vector envs -> step records; the Arrow experience store; evaluation
    learning/              advantages and the objectives (distillation, clipped RL, importance-weighted RL, mutual KL)
    rundir/                what a run leaves on disk: checkpoints, metrics.jsonl and TensorBoard, the run lock
    backends/              where partners act, learn and are evaluated: in this process, or one Ray actor each
    merging/               task vectors, merge operators, recipes, streaming safetensors merges, CMA-ES recipe search
    breeding/              compatibility, the offspring (merge | copy | mixture) and its gate; integration modes
    analysis/              dynamics (compat, drift, transfer, forgetting), the summary table, reports and plots
    loop.py                the generation loop: the one place that knows the order of phases
    cli/                   the `colearn` command: the Hydra main and its subcommands

envs/ (beside colearn/) holds the gymnasium text environments colearn acts in.
"""

__version__ = "0.1.0"
