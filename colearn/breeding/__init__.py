"""Breeding: from trained partners to the next generation's seed. Compatibility of the partners (task vectors, CKA),
the offspring (merged, a copy of the best partner, a mixture, or the merges of compatible clusters routed per env)
and its promotion gate; integration modes (partners acting as one policy), of which the mixture offspring is one,
saved and loaded as a mixture directory.

    compatibility.py  pure metrics (task-vector cosine, sign conflicts, weight distance, linear CKA) and `measure`
    clusters.py       merge.fallback=cluster: partners grouped by compatibility (complete linkage), merged, routed
    integrate.py      integration modes: route, route_confidence, ensemble, check_and_control, consultative
    kinds.py          the offspring kinds (Merged, Copy, Mixture, Clustered) and the gate's decision
    mixture.py        a mixture directory: members side by side with the env routing table
    offspring.py      make_offspring: compatibility -> merge | copy | mixture | clusters -> gate

May import: config, errors, models, experience, merging.
"""
