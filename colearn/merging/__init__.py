"""Weight-space merging: pure tensor functions over task vectors, recipes, and streaming checkpoints on disk.
Light: nothing here imports transformers, gymnasium, datasets or Hydra, so `colearn merge` starts fast.

    task_vectors.py     TaskVectors of one tensor (chunked), Gram matrix and cosines
    trimming.py         exact k-th largest magnitudes in chunks (TIES, magnitude_prune, breadcrumbs)
    operators.py        the operator registry (linear, slerp, task_arithmetic, ties, dare_*, della, ...)
    merge.py            Recipe (operator, weights, density, layer groups), merge_tensor, merge_state_dicts
    lora_merge.py       LoRA factors -> true dW, merged, re-factorized by truncated SVD
    adapters.py         LoRA adapter directories on one base model, merged
    streaming.py        safetensors merged tensor by tensor with the base's layout
    merge_io.py         reading and checking checkpoint directories, staging the output
    mergekit_recipe.py  mergekit YAML recipes, with mergekit_methods.py: mergekit's own definitions
    evolve.py           CMA-ES search over a recipe's per-layer-group weights and densities

May import: config, errors, models.
"""
