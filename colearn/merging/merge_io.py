"""Reading merge inputs and writing merge outputs: safetensors checkpoint directories, checked for one
architecture, sharding and vocabulary, and output directories written aside and renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from colearn.errors import ColearnError
from colearn.merging.streaming import read_layout
from colearn.models.directories import refuse_custom_code

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of a checkpoint that are weights or training state, not copied from the base.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
MERGEKIT_COPY = "mergekit_config.yml"  # a mergekit recipe's copy in OUT, named as mergekit names it
_SKIPPED = {"pytorch_model.bin.index.json", "merge_recipe.yaml", MERGEKIT_COPY}
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
}


@dataclass
class Checkpoint:
    path: Path
    files: dict[str, list[str]]  # safetensors file name -> the tensor names it holds
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, read from the headers
    model_type: str | None  # config.json's model_type


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ColearnError(f"--out {str(out)!r} already exists and is not an empty directory; choose a new one")


def read_checkpoint(path: Path, role: str) -> Checkpoint:
    """Returns the layout of a safetensors checkpoint directory, read from headers and the shard index."""
    if not path.is_dir():
        raise ColearnError(f"{role} checkpoint {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        hint = (
            "it is a mixture of several models (mixture.json); merge its members/<name> directories instead"
            if (path / "mixture.json").is_file()
            else "is it a Hugging Face model directory?"
        )
        raise ColearnError(f"{role} checkpoint {str(path)!r} has no config.json: {hint}")
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
    elif (path / SINGLE).is_file():
        files = {SINGLE: []}
    else:
        raise ColearnError(
            f"{role} checkpoint {str(path)!r} has no {SINGLE} or {INDEX}; re-save it with "
            "save_pretrained(dir, safe_serialization=True)"
        )
    shapes = {}
    for file in files:
        with safe_open(os.fspath(path / file), framework="pt") as handle:
            files[file] = list(handle.keys())
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    return Checkpoint(path, files, shapes, model_type)


def first_mismatch(base: Checkpoint, other: Checkpoint) -> str | None:
    """Returns how the first tensor (in sorted name order) that differs between the two differs, or None."""
    for key in sorted(set(base.shapes) | set(other.shapes)):
        if key not in other.shapes:
            return f"tensor {key!r} is missing (the base has it)"
        if key not in base.shapes:
            return f"tensor {key!r} is extra (the base lacks it)"
        if base.shapes[key] != other.shapes[key]:
            return f"tensor {key!r} has shape {other.shapes[key]} but {base.shapes[key]} in the base"
    return None


def check_architectures(base: Checkpoint, partners: list[Checkpoint]) -> None:
    """Raises ColearnError naming the first tensor in which a partner's architecture or sharding differs."""
    for partner in partners:
        where = f"checkpoint {str(partner.path)!r}"
        mismatch = first_mismatch(base, partner)
        if mismatch or partner.model_type != base.model_type:
            types = f"model_type {partner.model_type!r} vs {base.model_type!r}"
            raise ColearnError(
                f"{where} has another architecture than the base ({types}): "
                f"{mismatch or 'same tensors'}; merge checkpoints of one architecture"
            )
        if partner.files != base.files:
            raise ColearnError(
                f"{where} is sharded differently from the base {str(base.path)!r}; re-save all "
                "checkpoints with the same save_pretrained(max_shard_size=...)"
            )


def check_tokenizers(base: Path, partners: list[Path]) -> None:
    """Raises ColearnError naming the first token id whose token differs between a partner's vocab and the base's.

    Checkpoints without tokenizer files are not compared (the output gets the base's tokenizer).
    """
    vocab = _vocab(base)
    for partner in partners:
        other = _vocab(partner)
        if vocab is None or other is None:
            continue
        for token_id in range(max(len(vocab), len(other))):
            mine, theirs = vocab.get(token_id), other.get(token_id)
            if mine != theirs:
                raise ColearnError(
                    f"checkpoint {str(partner)!r} has another tokenizer than the base: token id {token_id} is "
                    f"{theirs!r} there but {mine!r} in the base; merge checkpoints that share one vocabulary"
                )


def _vocab(path: Path) -> dict[int, str] | None:
    """Returns {token id: token} of the directory's tokenizer, or None when it has no tokenizer files.

    A tokenizer.json is read with `tokenizers` (its vocabulary with the added tokens, as a
    fast tokenizer's get_vocab has it); other tokenizer files with transformers' AutoTokenizer.
    """
    if (path / "tokenizer.json").is_file():
        try:
            return {
                token_id: token
                for token, token_id in Tokenizer.from_file(os.fspath(path / "tokenizer.json"))
                .get_vocab(with_added_tokens=True)
                .items()
            }
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ColearnError(
                f"checkpoint {str(path)!r} has a tokenizer.json that does not load: {e}".splitlines()[0]
            ) from e
    if not any((path / f).is_file() for f in ("tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer  # only for tokenizers without tokenizer.json: it costs seconds to import

    refuse_custom_code(path, "checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ColearnError(f"checkpoint {str(path)!r} has tokenizer files that do not load: {e}".splitlines()[0]) from e
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yields a sibling temp dir that replaces `out` (absent or empty) when the block succeeds, and is removed
    when it fails."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, as check_output made sure
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenizer_source(dirs: list[Path]) -> Path | None:
    """Returns the first directory that holds tokenizer files, or None."""
    return next((d for d in dirs if any((d / name).is_file() for name in TOKENIZER_FILES)), None)


def copy_side_files(base: Path, out: Path) -> None:
    """Copies the base's config, generation config, tokenizer and shard index (every top-level non-weight file)."""
    for item in base.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _SKIPPED:
            shutil.copy2(item, out / item.name)


def read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """Returns every tensor of the checkpoint, in memory (the search merges candidates without a disk trip)."""
    state = {}
    for file in checkpoint.files:
        state.update(load_file(checkpoint.path / file))
    return state


def retype_side_files(tmp: Path, dtype: torch.dtype) -> None:
    """Sets config.json's dtype to `dtype` (as mergekit does) and the shard index's total size to the files'."""
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = name
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (tmp / INDEX).is_file():
        index = json.loads((tmp / INDEX).read_text(encoding="utf-8"))
        total = sum(
            max((span[1] for span in read_layout(tmp / f).spans.values()), default=0)
            for f in set(index["weight_map"].values())
        )
        index.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
