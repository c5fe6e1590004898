"""Loading GSM8K and MATH rows from local JSONL/JSON/CSV/Parquet files or the hub.

Local JSONL, JSON and CSV files are read with the standard library; Parquet needs pyarrow, and
hub dataset names need `datasets` (both imported only when used, with an error that says so).
Malformed rows (bytes that are not UTF-8, invalid JSON, not an object, missing or ill-typed
fields, a gold answer the grader cannot read) raise a ValueError that names the file and line
(or the dataset, split and row); with on_error="skip" they are dropped, counted on the Task
(`num_skipped`) and reported with logging.warning, never silently.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

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
    try:
        import datasets  # lazy: only hub names need it
    except ImportError:
        raise ImportError(
            f"{args[0]!r} is a hub dataset name, and loading it needs the `datasets` package "
            "(pip install datasets); or pass a local folder of train/test JSONL files"
        ) from None
    return datasets.load_dataset(*args, **kwargs)


class _BadRows:
    """Handles malformed rows of one file: raise with file and line, or skip, count and warn."""

    def __init__(self, path: str, on_error: str):
        self.path, self.on_error, self.skipped = path, on_error, 0

    def __call__(self, lineno: int, reason: str) -> None:
        if self.on_error == "raise":
            raise ValueError(f"{self.path}:{lineno}: malformed row: {reason}")
        self.skipped += 1
        logger.warning("%s:%d: skipping malformed row: %s", self.path, lineno, reason)


def _lines(path: str, bad: _BadRows) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 one line at a time (a leading byte
    order mark dropped), so that a bad byte is reported with its line, or skipped with it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            yield lineno, text


def _read_jsonl(path: str, on_error: str) -> Rows:
    bad = _BadRows(path, on_error)
    records, locations = [], []
    for lineno, line in _lines(path, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            bad(lineno, str(e))
            continue
        if not isinstance(row, dict):
            bad(lineno, f"expected a JSON object, got {type(row).__name__}")
            continue
        records.append(row)
        locations.append(f"{path}:{lineno}")
    return Rows(records, locations, path, bad.skipped)


def _read_json(path: str, on_error: str) -> Rows:
    """A .json file: one JSON array of objects, or JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        return _read_jsonl(path, on_error)
    bad = _BadRows(path, "raise")  # a broken array has no row to skip
    lines = list(_lines(path, bad))
    try:
        rows = json.loads("".join(text for _, text in lines))
    except json.JSONDecodeError as e:
        bad(e.lineno, e.msg)
    return Rows(rows, [f"{path} item {i}" for i in range(len(rows))], path)


def _read_csv(path: str, on_error: str) -> Rows:
    """A CSV file with a header row; a record may span lines (quoted newlines) and is located
    at its first line."""
    bad = _BadRows(path, on_error)
    lines = list(_lines(path, bad))
    reader = csv.reader([text for _, text in lines])
    header, records, locations, consumed = None, [], [], 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad(lines[min(consumed, len(lines) - 1)][0], f"CSV: {e}")
            consumed = reader.line_num
            continue
        lineno = lines[consumed][0]
        consumed = reader.line_num
        if not values:
            continue
        if header is None:
            header = values
            continue
        if len(values) != len(header):
            bad(lineno, f"expected {len(header)} fields ({', '.join(header)}), got {len(values)}")
            continue
        records.append(dict(zip(header, values)))
        locations.append(f"{path}:{lineno}")
    return Rows(records, locations, path, bad.skipped)


def _read_parquet(path: str) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path!r} needs pyarrow (pip install pyarrow); or convert it "
                          "to JSONL") from None
    records = pq.read_table(path).to_pylist()
    return Rows(records, [f"{path} row {i}" for i in range(len(records))], path)


def _split_files(directory: str, split: str) -> list[str]:
    for pattern in (
        f"{split}.jsonl", f"{split}.json", f"{split}.csv", f"{split}.parquet",
        f"{split}-*.parquet", f"{split}/*.parquet", f"data/{split}-*.parquet",
        f"*/{split}-*.parquet",
    ):
        found = sorted(glob.glob(os.path.join(directory, pattern)))
        if found:
            return found
    return []


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def _read_file(path: str, on_error: str) -> Rows:
    if path.endswith(".parquet"):
        return _read_parquet(path)
    reader = _READERS.get(os.path.splitext(path)[1])
    if reader is None:
        raise ValueError(f"unsupported file type {path!r}: expected .jsonl, .json, .csv or .parquet")
    return reader(path, on_error)


def read_rows(source: str, split: str, hub_config: str | None = None,
              on_error: str = "raise") -> Rows:
    """Rows of `split` from a local file, a local directory holding `{split}.jsonl` /
    `{split}.json` / `{split}.csv` / `{split}.parquet` (or `{split}-*.parquet` shards), or a
    hub dataset name."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if os.path.isfile(source):
        return _read_file(source, on_error)
    if os.path.isdir(source):
        files = _split_files(source, split)
        if not files:
            raise ValueError(f"no {split}.jsonl, {split}.csv or {split}.parquet file in {source!r}")
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
