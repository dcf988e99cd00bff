"""The experience store: append-only Arrow shards (one per partner per round) of step records."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

from colearn.errors import ColearnError

FEATURES = datasets.Features(
    {
        "run_id": datasets.Value("string"),
        "generation": datasets.Value("int32"),
        "round": datasets.Value("int32"),
        "partner": datasets.Value("string"),
        "env_id": datasets.Value("string"),
        "env": datasets.Value("string"),
        "episode_id": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "step": datasets.Value("int32"),
        "observation": datasets.Value("string"),
        "action": datasets.Value("string"),
        "legal_actions": datasets.Sequence(datasets.Value("string")),
        "action_charset": datasets.Value("string"),  # generate mode: the characters the answer was held to
        "prompt_ids": datasets.Sequence(datasets.Value("int32")),
        "action_ids": datasets.Sequence(datasets.Value("int32")),
        "logprob": datasets.Value("float32"),
        "reward": datasets.Value("float32"),
        "return_to_go": datasets.Value("float32"),
        "done": datasets.Value("bool"),
        "terminated": datasets.Value("bool"),
        "invalid": datasets.Value("bool"),
        "success": datasets.Value("bool"),
        "episode_return": datasets.Value("float32"),
    }
)
SCHEMA = FEATURES.arrow_schema


class ExperienceStore:
    """Step records of a run. Shards on disk are memory-mapped, so the store's RAM stays flat."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.shards: list[datasets.Dataset] = []
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in sorted(self.root.glob("shard_*")):
                if d.is_dir() and not d.name.endswith(".tmp"):
                    self.shards.append(datasets.load_from_disk(str(d)))

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Adds rows as one new shard; on disk it appears whole (written aside, then renamed) or not at all."""
        if not rows:
            return
        # straight to Arrow: Dataset.from_list infers and re-encodes every value in Python, ~20x slower
        table = pa.Table.from_pylist([{k: r[k] for k in FEATURES} for r in rows], schema=SCHEMA)
        shard = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=FEATURES))
        if self.root is not None:
            final = self.root / f"shard_{len(self.shards):06d}"
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shard.save_to_disk(str(tmp))
            os.replace(tmp, final)
            shard = datasets.load_from_disk(str(final))
        self.shards.append(shard)

    def truncate(self, n_shards: int) -> None:
        """Drops shards past the first `n_shards` (those written after the checkpoint being resumed)."""
        for i in range(n_shards, len(self.shards)):
            if self.root is not None:
                shutil.rmtree(self.root / f"shard_{i:06d}", ignore_errors=True)
        self.shards = self.shards[:n_shards]

    def table(self) -> pa.Table:
        """Returns every record as one Arrow table."""
        if not self.shards:
            return FEATURES.arrow_schema.empty_table()
        return pa.concat_tables([s.data.table for s in self.shards])

    def select(
        self,
        partner: str | None = None,
        env: str | None = None,
        generation: int | None = None,
        round: int | None = None,
        success: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Returns the records matching every given field, in insertion order."""
        tables = [s.data.table for s in self.shards if len(s) and _may_match(s, partner, generation, round)]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        conditions = {"partner": partner, "env": env, "generation": generation, "round": round, "success": success}
        mask = None
        for column, value in conditions.items():
            if value is None:
                continue
            term = pc.equal(table[column], value)
            mask = term if mask is None else pc.and_(mask, term)
        return (table.filter(mask) if mask is not None else table).to_pylist()


def load(run_dir: str | Path) -> datasets.Dataset:
    """Returns every step record of a run (RUN_DIR/experience: each shard of each partner and round, in the order
    they were written) as one memory-mapped `datasets.Dataset` with the columns of FEATURES."""
    root = Path(run_dir) / "experience"
    if not root.is_dir():
        raise ColearnError(f"{str(run_dir)!r} has no experience/ directory; is it a colearn run directory?")
    shards = [
        datasets.load_from_disk(str(d))
        for d in sorted(root.glob("shard_*"))
        if d.is_dir() and not d.name.endswith(".tmp")
    ]
    if not shards:
        return datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)
    return datasets.concatenate_datasets(shards)


def _may_match(shard: datasets.Dataset, partner: str | None, generation: int | None, round: int | None) -> bool:
    # shards usually hold one partner's round: skip those that cannot match before filtering rows
    table = shard.data.table
    return all(
        want is None or want in pc.unique(table[col]).to_pylist()
        for col, want in (("partner", partner), ("generation", generation), ("round", round))
    )
