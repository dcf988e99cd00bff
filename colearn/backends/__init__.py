"""Backends: where each partner's phases run. The loop decides what runs and in which order; a backend only places
it: every partner in this process, one after another, or one Ray actor per partner, all at once.

    work.py      the work the loop hands a backend (a partner's episodes, its lesson), the code that does it wherever
                 it runs, and the state learning changes (trained tensors, optimizer state) moved between copies
    local.py     LocalBackend: the run's own partners, in turn, in this process
    ray.py       RayBackend: one Ray actor per partner owns its model, optimizer and vector envs (Ray imported on use);
                 a partner travels to its actor as the files of its saved directory, as a checkpoint holds it
    registry.py  BACKENDS by name (config.backend) and make_backend

May import: config, errors, models, experience, learning, rundir.
"""
