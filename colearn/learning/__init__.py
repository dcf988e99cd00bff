"""Learning by experience: advantages and the objectives (distillation of selected successes, clipped RL on own
steps, importance-weighted RL on the partner's, mutual KL) in one update of a partner.

    learn.py   learn, select_for_distillation, optimizer_for, the advantages and losses

May import: config, errors, models.
"""
