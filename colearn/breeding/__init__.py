"""Breeding: from a trained pair to the next generation's seed. Compatibility of the partners (task vectors, CKA),
the offspring (merged, a copy of the best partner, or a mixture) and its promotion gate; integration modes (a pair
acting as one policy), of which the mixture offspring is one, saved and loaded as a mixture directory.

    compatibility.py  pure metrics (task-vector cosine, sign conflicts, weight distance, linear CKA) and `measure`
    integrate.py      integration modes: route, route_confidence, ensemble, check_and_control, consultative
    mixture.py        a mixture directory: partners side by side with the env routing table
    offspring.py      make_offspring: compatibility -> merge | copy | mixture -> gate

May import: config, errors, models, experience, merging.
"""
