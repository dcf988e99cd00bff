"""What researchers study in a run: how partners drift apart, transfer, and forget.

Every function returns a flat dict of namespaced metrics, ready for `Logger.write`:

    compat/cka/A~B            linear CKA of the partners' last-layer hidden states on a fixed probe (1 = same geometry)
    compat/cka/A~ancestor     the same against the generation's ancestor
    compat/cosine/A~B         cosine of the task vectors (partner - ancestor)
    compat/sign_conflict/A~B  fraction of coordinates both changed where they moved in opposite directions
    weights/distance/A        L2 distance of the partner's weights from the ancestor
    weights/distance/A~B      L2 distance between the partners
    transfer/unseen_return/A/<env>   normalized return on an env the partner never acted in
    forgetting/<partner>/<env>       best normalized return so far minus now (>= 0; 0 = nothing forgotten)

CKA reads the last layer's hidden states at every token of the probe prompts: two partners with CKA
near 1 represent the envs alike and average well; falling CKA is the "incompatible specialization"
after which a mixture beats a merge (Pari et al.). The compat/ and weights/ numbers are measured once
(`colearn.breeding.compatibility.measure`): the loop logs them here and the offspring decides on them.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from colearn.breeding.compatibility import Compatibility
from colearn.config import EnvSpec
from colearn.experience.evaluate import EnvScore, normalized_by_env
from colearn.experience.rollout import env_info
from colearn.models.partner import Partner

Scores = dict[str, dict[str, float]]  # partner -> env -> normalized return


def probe_set(suite: list[EnvSpec], n: int, seed: int = 0) -> list[str]:
    """Returns up to `n` distinct observations from each env (random-action episodes on seeded resets):
    a fixed set of inputs on which to compare partners' representations across a whole run."""
    probe: list[str] = []
    for index, spec in enumerate(suite):
        rng = np.random.default_rng([seed, index])
        actions = env_info(spec)["action_names"] or ["?"]  # generate-mode envs: a new problem per reset
        env = gym.make(spec.id, **spec.kwargs)
        seen: dict[str, None] = {}
        for _ in range(4 * n):  # small maps have fewer than n states: stop trying after a while
            obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
            for _ in range(50):
                seen.setdefault(obs)
                obs, _, term, trunc, _ = env.step(actions[rng.integers(len(actions))])
                if term or trunc or len(seen) >= n:
                    break
            if len(seen) >= n:
                break
        env.close()
        probe += list(seen)[:n]
    return probe


def pair_metrics(compat: Compatibility) -> dict[str, float]:
    """Returns the measured compatibility (`compatibility.measure`) as namespaced metrics: compat/cka|cosine|
    sign_conflict/A~B and weights/distance/A~B of every pair, compat/cka/A~ancestor and weights/distance/A of every
    partner (the CKA ones only where a probe was given)."""
    out: dict[str, float] = {}
    for (a, b), pair in compat.pairs.items():
        if pair.cka is not None:
            out[f"compat/cka/{a}~{b}"] = pair.cka
        out[f"compat/cosine/{a}~{b}"] = pair.cosine
        out[f"compat/sign_conflict/{a}~{b}"] = pair.sign_conflict
        out[f"weights/distance/{a}~{b}"] = pair.distance
    for name, drift in compat.drift.items():
        if drift.cka is not None:
            out[f"compat/cka/{name}~ancestor"] = drift.cka
        out[f"weights/distance/{name}"] = drift.distance
    return out


def main_scores(scores: dict[str, list[EnvScore]]) -> Scores:
    """Returns {policy owner: {env: normalized return}} of the greedy policy (sampled when greedy was not
    evaluated): the table forgetting and transfer read."""
    return {owner: normalized_by_env(ss) for owner, ss in scores.items()}


def forgetting(history: list[Scores], current: Scores) -> dict[str, float]:
    """Returns forgetting/<partner>/<env>: the best normalized return the partner (by name) reached on
    the env in any earlier snapshot or now, minus its return now; envs it was never scored on before
    are left out, so a first generation has nothing to forget."""
    out = {}
    for owner, now in current.items():
        for env, value in now.items():
            before = [h[owner][env] for h in history if env in h.get(owner, {})]
            if before:
                out[f"forgetting/{owner}/{env}"] = max(*before, value) - value
    return out


def transfer(current: Scores, partners: list[Partner]) -> dict[str, float]:
    """Returns transfer/unseen_return/<partner>/<env>: normalized return on each env the partner never acts in."""
    return {
        f"transfer/unseen_return/{p.name}/{env}": value
        for p in partners
        for env, value in current.get(p.name, {}).items()
        if env not in p.envs
    }
