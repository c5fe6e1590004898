"""Loading GSM8K and MATH rows through `datasets`, from local JSONL/Parquet or the hub.

Malformed rows (invalid JSON, not an object, missing or ill-typed fields) raise a ValueError that
names the file and line (or the dataset, split and row); with on_error="skip" they are dropped,
counted on the Task (`num_skipped`) and reported with logging.warning, never silently.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

from vineppo.tasks.base import Example

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Rows:
    """Raw rows of one split and where each came from ("file.jsonl:12", "name[split] row 3")."""

    records: list
    locations: list[str]
    source: str
    num_skipped: int = 0


def _load_dataset(*args, **kwargs):
    import datasets  # lazy: the engine and trainer import without it

    return datasets.load_dataset(*args, **kwargs)


def _read_jsonl(path: str, on_error: str) -> Rows:
    with open(path, encoding="utf-8") as f:
        line_numbers = [i + 1 for i, line in enumerate(f) if line.strip()]
    try:
        ds = _load_dataset("json", data_files=path, split="train")
        records = ds.to_list()
        if len(records) == len(line_numbers):
            return Rows(records, [f"{path}:{n}" for n in line_numbers], path)
    except Exception as e:  # noqa: BLE001 - diagnosed line by line below
        logger.debug("datasets could not read %s (%s); reading it line by line", path, e)
    # Line-by-line pass: finds the offending line (datasets' error does not name it) or, with
    # on_error="skip", keeps every valid line.
    records, locations, skipped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                if on_error == "raise":
                    raise ValueError(f"{path}:{lineno}: malformed row: {e}") from None
                skipped += 1
                logger.warning("%s:%d: skipping malformed row: %s", path, lineno, e)
                continue
            records.append(row)
            locations.append(f"{path}:{lineno}")
    return Rows(records, locations, path, skipped)


def _read_parquet(path: str) -> Rows:
    ds = _load_dataset("parquet", data_files=path, split="train")
    records = ds.to_list()
    return Rows(records, [f"{path} row {i}" for i in range(len(records))], path)


def _split_files(directory: str, split: str) -> list[str]:
    for pattern in (
        f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet",
        f"{split}/*.parquet", f"data/{split}-*.parquet", f"*/{split}-*.parquet",
    ):
        found = sorted(glob.glob(os.path.join(directory, pattern)))
        if found:
            return found
    return []


def _read_file(path: str, on_error: str) -> Rows:
    if path.endswith(".parquet"):
        return _read_parquet(path)
    if path.endswith((".jsonl", ".json")):
        return _read_jsonl(path, on_error)
    raise ValueError(f"unsupported file type {path!r}: expected .jsonl, .json or .parquet")


def read_rows(source: str, split: str, hub_config: str | None = None,
              on_error: str = "raise") -> Rows:
    """Rows of `split` from a local file, a local directory holding `{split}.jsonl` /
    `{split}.parquet` (or `{split}-*.parquet` shards), or a hub dataset name."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if os.path.isfile(source):
        return _read_file(source, on_error)
    if os.path.isdir(source):
        files = _split_files(source, split)
        if not files:
            raise ValueError(f"no {split}.jsonl or {split}.parquet file in {source!r}")
        parts = [_read_file(f, on_error) for f in files]
        return Rows(
            [r for p in parts for r in p.records], [loc for p in parts for loc in p.locations],
            source, sum(p.num_skipped for p in parts),
        )
    if _HUB_NAME.match(source):
        ds = _load_dataset(source, hub_config, split=split)
        records = ds.to_list()
        return Rows(records, [f"{source}[{split}] row {i}" for i in range(len(records))], source)
    raise ValueError(f"{source!r} is neither a local file or directory nor a hub dataset name")


def to_examples(rows: Rows, split: str, make: Callable[[dict, int, str], Example],
                on_error: str = "raise", limit: int | None = None) -> tuple[list[Example], int]:
    """Examples built with `make(record, index, split)`; returns (examples, number skipped,
    including rows skipped while reading)."""
    examples, skipped, first = [], rows.num_skipped, None
    for i, (record, loc) in enumerate(zip(rows.records, rows.locations)):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
            examples.append(make(record, i, split))
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"{loc}: malformed row: {e}") from None
            skipped += 1
            first = first or f"{loc}: {e}"
    if skipped:
        logger.warning(
            "skipped %d malformed %s rows of %s%s", skipped, split, rows.source,
            f" (first: {first})" if first else "",
        )
    return examples, skipped
