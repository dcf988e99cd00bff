"""Shared fixtures: one tiny tokenizer + ancestor built from the envs' text, partners, env specs.

The ancestor is built once per session (it is small: ~14K parameters); tests that change weights
work on copies (`Partner.clone` or `copy.deepcopy`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from colearn.config import EnvSpec, ModelConfig  # noqa: E402

torch.set_num_threads(1)

LAKE_ID = "colearn/FrozenLake-v0"
ADDITION_ID = "colearn/Addition-v0"
FROZEN_LAKE_ACTIONS = ["left", "down", "right", "up"]


def tiny_model_config(**overrides) -> ModelConfig:
    """The smallest model config the tests use (1 layer, hidden 32)."""
    return ModelConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, **overrides})


@pytest.fixture(scope="session")
def lake_spec() -> EnvSpec:
    return EnvSpec(LAKE_ID)


@pytest.fixture(scope="session")
def addition_spec() -> EnvSpec:
    return EnvSpec(ADDITION_ID, kwargs={"digits": 1})


@pytest.fixture(scope="session")
def line_spec() -> EnvSpec:
    """A 1x3 FrozenLake ("SFG"): a random policy reaches the goal within a few steps, so successes happen."""
    return EnvSpec(LAKE_ID, name="Line", kwargs={"desc": ["SFG"]})


@pytest.fixture(scope="session")
def model_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def corpus(lake_spec, addition_spec) -> tuple[list[str], list[str]]:
    """(texts, action names) of the lake and addition envs, as the loop builds its tokenizer from."""
    from colearn.loop import env_corpus

    return env_corpus([lake_spec, addition_spec])


@pytest.fixture(scope="session")
def ancestor(model_cfg, corpus):
    """(model, tokenizer): the tiny ancestor, seed 0, in eval mode. Do not modify it in place."""
    from colearn.models import build_ancestor

    texts, names = corpus
    model, tokenizer = build_ancestor(model_cfg, texts, names, seed=0)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer(ancestor):
    return ancestor[1]


@pytest.fixture
def partner(ancestor, model_cfg):
    """A partner over the session's ancestor weights (shared: do not train it; clone it instead)."""
    from colearn.partner import Partner

    model, tokenizer = ancestor
    return Partner("A", model, tokenizer, model_cfg, envs=["FrozenLake", "Addition"])
