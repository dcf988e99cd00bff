"""Experience: partners act in gymnasium text envs and leave step records; the Arrow store keeps them; evaluation
plays fixed-seed episodes and scores them against each env's optimal and random return.

    rollout.py   collect: N episodes in a vector env, one batched forward pass per step -> step records
    store.py     ExperienceStore: append-only Arrow shards (one per partner per round); select; load a whole run
    evaluate.py  EnvScore of a policy per env (exact over the env's table where it has one); return_scorer

May import: config, errors, models.
"""
