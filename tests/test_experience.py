"""Tests of colearn.experience.store.ExperienceStore: append-only shards, reload, select, crash leftovers, truncate;
and of experience.load, a whole run's records in one Dataset."""

from __future__ import annotations

import shutil

import pytest

from colearn.errors import ColearnError
from colearn.experience import store as experience
from colearn.experience.store import FEATURES, ExperienceStore


def row(
    i: int,
    partner: str = "A",
    env: str = "Lake",
    generation: int = 0,
    round: int = 0,
    success: bool = False,
    **overrides,
) -> dict:
    """A complete step record with exactly representable float32 values."""
    r = {
        "run_id": "run",
        "generation": generation,
        "round": round,
        "partner": partner,
        "env_id": f"colearn/{env}-v0",
        "env": env,
        "episode_id": f"{partner}/g{generation}/r{round}/{env}/{i}",
        "seed": 10_000_000_000 + i,
        "step": i % 3,
        "observation": f"obs {i}\nline",
        "action": "left",
        "legal_actions": ["left", "down"],
        "action_charset": "",
        "prompt_ids": [1, 2, i],
        "action_ids": [7],
        "logprob": -0.5,
        "reward": float(i % 2),
        "return_to_go": 1.5,
        "done": i % 3 == 2,
        "terminated": i % 3 == 2,
        "invalid": False,
        "success": success,
        "episode_return": 0.25,
    }
    r.update(overrides)
    return r


def shard_a() -> list[dict]:
    return [row(i, "A", "Lake" if i % 2 else "Mirror", 0, 0, success=i % 3 == 0) for i in range(7)]


def shard_b() -> list[dict]:
    return [row(100 + i, "B", "Mirror" if i % 2 else "Lake", 0, 1, success=i % 4 == 0) for i in range(6)]


def shard_c() -> list[dict]:
    return [row(200 + i, "A", "Lake", 1, 0, success=True, extra_field="ignored") for i in range(3)]


def strip(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in FEATURES} for r in rows]


@pytest.fixture
def filled(tmp_path):
    store = ExperienceStore(tmp_path / "exp")
    store.append(shard_a())
    store.append(shard_b())
    store.append(shard_c())
    return store


def test_rows_round_trip_exactly(filled):
    assert len(filled) == 16
    assert filled.table().to_pylist() == strip(shard_a() + shard_b() + shard_c())
    assert filled.select() == strip(shard_a() + shard_b() + shard_c())


def test_reload_from_disk_gives_the_same_rows(filled, tmp_path):
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["shard_000000", "shard_000001", "shard_000002"]
    reloaded = ExperienceStore(tmp_path / "exp")
    assert len(reloaded) == len(filled) == 16
    assert len(reloaded.shards) == 3
    assert reloaded.table().to_pylist() == filled.table().to_pylist() == strip(shard_a() + shard_b() + shard_c())
    assert reloaded.table().schema == FEATURES.arrow_schema


def test_empty_append_writes_nothing(tmp_path):
    store = ExperienceStore(tmp_path)
    store.append([])
    assert len(store) == 0 and not list(tmp_path.iterdir())
    assert store.select(partner="A") == []
    assert store.table().num_rows == 0


def test_missing_field_is_an_error(tmp_path):
    bad = row(0)
    del bad["logprob"]
    store = ExperienceStore(tmp_path)
    with pytest.raises(KeyError):
        store.append([bad])
    assert len(store) == 0


QUERIES = [
    {"partner": "A"},
    {"partner": "B"},
    {"partner": "C"},
    {"env": "Lake"},
    {"env": "Mirror", "partner": "B"},
    {"generation": 0},
    {"generation": 1},
    {"generation": 7},
    {"round": 1},
    {"round": 0, "generation": 0},
    {"success": True},
    {"success": False},
    {"partner": "A", "success": True, "env": "Lake"},
    {"partner": "A", "generation": 1, "round": 0},
    {"partner": "B", "round": 0},
]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: ",".join(f"{k}={v}" for k, v in q.items()))
def test_select_returns_exactly_the_matching_rows_in_order(filled, query):
    everything = strip(shard_a() + shard_b() + shard_c())
    expected = [r for r in everything if all(r[k] == v for k, v in query.items())]
    got = filled.select(**query)
    assert got == expected
    reloaded = ExperienceStore(filled.root)
    assert reloaded.select(**query) == expected


def test_select_queries_are_not_vacuous(filled):
    assert len(filled.select(partner="A", success=True, env="Lake")) == 4  # i=3 of shard A, the 3 rows of shard C
    assert filled.select(partner="C") == [] and filled.select(generation=7) == []


def test_in_memory_store(tmp_path):
    store = ExperienceStore()
    store.append(shard_a())
    store.append(shard_b())
    assert store.select(partner="B", success=True) == [r for r in strip(shard_b()) if r["success"]]
    assert not list(tmp_path.iterdir())


def test_leftover_tmp_shard_is_ignored(filled, tmp_path):
    root = tmp_path / "exp"
    # a crash mid-write leaves a complete-looking but unrenamed shard behind
    shutil.copytree(root / "shard_000000", root / "shard_000009.tmp")
    (root / "shard_000003.tmp").mkdir()  # and one that had barely started
    reloaded = ExperienceStore(root)
    assert len(reloaded.shards) == 3 and len(reloaded) == 16
    assert reloaded.table().to_pylist() == filled.table().to_pylist()
    # appending next to the leftovers writes the next shard normally
    reloaded.append([row(300, "B", "Lake", 2, 0)])
    assert (root / "shard_000003").is_dir() and not (root / "shard_000003.tmp").exists()
    assert [r["episode_id"] for r in ExperienceStore(root).select(generation=2)] == ["B/g2/r0/Lake/300"]


def test_truncate_removes_later_shards_from_disk(filled, tmp_path):
    root = tmp_path / "exp"
    filled.truncate(1)
    assert len(filled.shards) == 1 and len(filled) == 7
    assert sorted(p.name for p in root.iterdir()) == ["shard_000000"]
    assert filled.table().to_pylist() == strip(shard_a())
    reloaded = ExperienceStore(root)
    assert reloaded.table().to_pylist() == strip(shard_a())
    # the next append takes the freed shard number
    reloaded.append(shard_b())
    assert sorted(p.name for p in root.iterdir()) == ["shard_000000", "shard_000001"]
    assert ExperienceStore(root).table().to_pylist() == strip(shard_a() + shard_b())
    filled.truncate(5)  # more shards than exist: nothing happens
    assert len(filled) == 7


def test_truncate_to_zero(filled, tmp_path):
    filled.truncate(0)
    assert len(filled) == 0 and filled.select() == []
    assert not list((tmp_path / "exp").iterdir())


def test_load_returns_every_row_of_a_run_in_one_dataset(tmp_path):
    store = ExperienceStore(tmp_path / "experience")
    for shard in (shard_a(), shard_b(), shard_c()):
        store.append(shard)
    shutil.copytree(tmp_path / "experience" / "shard_000000", tmp_path / "experience" / "shard_000003.tmp")
    rows = experience.load(tmp_path)
    assert rows.features == FEATURES and len(rows) == 16  # both partners, every round, not the leftover
    assert rows.to_list() == strip(shard_a() + shard_b() + shard_c())
    assert rows.filter(lambda r: r["partner"] == "B").num_rows == 6


def test_load_of_a_run_without_experience(tmp_path):
    (tmp_path / "experience").mkdir()
    empty = experience.load(tmp_path)
    assert len(empty) == 0 and empty.features == FEATURES
    with pytest.raises(ColearnError, match="no experience/ directory"):
        experience.load(tmp_path / "nowhere")
