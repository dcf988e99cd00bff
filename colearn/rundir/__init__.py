"""The run directory: what a run leaves on disk and reads back to continue exactly.

    checkpoint.py  crash-safe round checkpoints (SHA-256 manifest) and generation directories; loading them back
    logger.py      metrics.jsonl (one JSON object per event) and TensorBoard scalars; read_metrics
    runlock.py     one process at a time in a run directory (an OS file lock)
    signals.py     SIGINT/SIGTERM stop the loop after its next checkpoint (StopOnSignal)
    deployment.py  deployed.json (the best offspring so far), pruning old generations, atomic JSON writes

May import: config, errors, models, experience, learning.
"""
