"""Write records into Parquet shards plus a ``manifest.json``, resumably and without patient leakage.

Layout of a shard location (local folder or ``s3://`` prefix)::

    train-00000.parquet  train-00001.parquet  val-00000.parquet  test-00000.parquet  manifest.json

Design choices:

* **Streaming.** Records are buffered per split only up to ``records_per_shard``; a dataset larger than
  memory is fine.
* **Deterministic.** The reader order is deterministic and a record's split is a hash of
  ``(seed, group_id)`` when the dataset has no split of its own, so shard *k* of a split always holds the
  same records. A rerun after a crash therefore keeps shards that already exist (each was written
  atomically) and produces the same manifest as an uninterrupted run, without duplicating or losing rows.
  That holds only for the same inputs: :mod:`medvl.data.fingerprint` records them beside the shards, and
  other inputs delete the old shards and rebuild. A kept shard must also hold exactly the ids it would be
  written with, or it is rewritten.
* **Visible once complete.** Shards are written atomically and the manifest last; readers go through the
  manifest, so a half-prepared location is never read.
* **No leakage.** Splits are grouped by ``group_id`` (patient, or study): a group seen in two splits, which
  can only happen when the dataset's own split leaks, aborts prepare before the manifest is written, unless
  ``leakage_check="report"`` (:mod:`medvl.data.leakage`).
* **Every row counted.** The manifest counts rows ``skipped`` (unusable), ``filtered`` (a setting's choice,
  e.g. another language) and ``repaired`` (kept after a repair, e.g. undecodable bytes replaced).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medvl.data import storage
from medvl.data.fingerprint import INPUTS_FILE, changed_inputs
from medvl.data.images import UnreadableImage, decode_image
from medvl.data.leakage import GroupSplits, LeakageError
from medvl.data.records import (
    FILTER_REASONS,
    SHARD_COLUMNS,
    SPLITS,
    TRAIN_OR_VAL,
    ReaderItem,
    Record,
    Repaired,
    Skipped,
)

MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}\.parquet")

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("group_id", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
        ("text", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_type", pa.string()),
        ("meta", pa.string()),
    ]
)
assert tuple(SHARD_SCHEMA.names) == SHARD_COLUMNS


__all__ = ["LeakageError", "ShardWriter", "assign_split", "read_manifest", "shard_paths", "write_shards"]


def assign_split(group_id: str, seed: int, fractions: list[float]) -> str:
    """Deterministic split of a group: a stable hash of (seed, group) mapped onto the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if u < cumulative:
            return split
    return SPLITS[-1]


def carve_val(group_id: str, seed: int, fractions: list[float]) -> str:
    """A group of an official train split without validation: "val" with the fractions' val:(train+val) share."""
    train, val = fractions[0], fractions[1]
    if train + val <= 0:
        return "train"
    return assign_split(group_id, seed, [train / (train + val), val / (train + val), 0.0])


@dataclass
class ShardWriter:
    """Buffers rows of one location and flushes a Parquet shard per ``records_per_shard`` rows of a split."""

    fs: pafs.FileSystem
    root: str
    records_per_shard: int
    shards: list[dict] = field(default_factory=list)
    _buffers: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    _next_index: Counter = field(default_factory=Counter)
    reused: int = 0

    def add(self, record: Record) -> None:
        buffer = self._buffers[record.split]
        buffer.append(record.to_row())
        if len(buffer) >= self.records_per_shard:
            self._flush(record.split)

    def close(self) -> None:
        for split in list(self._buffers):
            if self._buffers[split]:
                self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._buffers.pop(split)
        name = f"{split}-{self._next_index[split]:05d}.parquet"
        self._next_index[split] += 1
        path = storage.join(self.root, name)
        data = storage.read_bytes(self.fs, path) if storage.exists(self.fs, path) else None
        if data is not None and _shard_ids(data) == [row["id"] for row in rows]:
            self.reused += 1  # written by an earlier, interrupted run with the same inputs
        else:
            data = _parquet_bytes(rows)
            storage.write_bytes_atomic(self.fs, path, data)
        self.shards.append(
            {"path": name, "split": split, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        )


def _shard_ids(data: bytes) -> list[str] | None:
    try:
        return pq.read_table(io.BytesIO(data), columns=["id"]).column("id").to_pylist()
    except (pa.ArrowException, OSError):  # not a readable Parquet file: rewrite it
        return None


def _parquet_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_shards(
    items: Iterable[ReaderItem],
    location: str,
    *,
    source: str,
    format: str,
    seed: int = 0,
    split_fractions: list[float] | None = None,
    records_per_shard: int = 2048,
    endpoint_url: str = "",
    leakage_check: str = "refuse",
    inputs: dict | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Validate and write every record; return the manifest (also written to ``<location>/manifest.json``).

    ``inputs`` (:func:`medvl.data.fingerprint.prepare_inputs`): shards already at ``location`` are kept only if
    they were made from the same inputs; otherwise they are deleted first. ``log`` hears which it was.
    """
    fractions = split_fractions or [0.8, 0.1, 0.1]
    fs, root = storage.filesystem_for(location, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
    if inputs is not None:
        _claim_location(fs, root, location, inputs, log or (lambda message: None))
    writer = ShardWriter(fs, root, records_per_shard)
    counts: Counter = Counter()
    skipped: Counter = Counter()
    filtered: Counter = Counter()
    repaired: Counter = Counter()
    groups = GroupSplits(leakage_check)
    seen = 0
    for item in items:
        seen += 1
        if progress and seen % 500 == 0:
            progress(seen)
        if isinstance(item, Repaired):
            repaired[item.reason] += 1
            seen -= 1  # a note about the record that follows, not a row
            continue
        if isinstance(item, Skipped):
            (filtered if item.reason in FILTER_REASONS else skipped)[item.reason] += 1
            continue
        reason = _rejection(item)
        if reason:
            skipped[reason] += 1
            continue
        if item.split == TRAIN_OR_VAL:
            item.split = carve_val(item.group_id, seed, fractions)
        item.split = item.split or assign_split(item.group_id, seed, fractions)
        groups.add(item.group_id, item.split)
        counts[item.split] += 1
        writer.add(item)
    writer.close()
    manifest = {
        "source": source,
        "format": format,
        "seed": seed,
        "split_fractions": fractions,
        "counts": {split: counts.get(split, 0) for split in SPLITS},
        "groups": groups.groups_per_split(),
        "skipped": dict(sorted(skipped.items())),
        "filtered": dict(sorted(filtered.items())),
        "repaired": dict(sorted(repaired.items())),
        "leakage": groups.overlap(),
        "shards": writer.shards,
    }
    if inputs is not None:
        manifest["inputs"] = inputs
    storage.write_bytes_atomic(
        fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    manifest["_reused_shards"] = writer.reused  # not persisted: differs between a fresh run and a resume
    return manifest


def _claim_location(fs: pafs.FileSystem, root: str, location: str, inputs: dict, log: Callable[[str], None]) -> None:
    """Keep the shards at ``root`` if they were made from ``inputs``; else delete them. Record ``inputs`` first."""
    inputs_path = storage.join(root, INPUTS_FILE)
    before = json.loads(storage.read_bytes(fs, inputs_path)) if storage.exists(fs, inputs_path) else None
    listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    existing = [info.path for info in listing if info.type == pafs.FileType.File
                and (SHARD_NAME.fullmatch(info.base_name) or info.base_name == MANIFEST)]
    if before == inputs:
        if existing:
            log(f"{location}: same inputs as the shards already there: keeping the finished ones")
        return
    if existing:
        log(f"{location}: rebuilding, its {len(existing)} file(s) were prepared from other inputs: "
            + "; ".join(changed_inputs(before, inputs)))
        for path in existing:
            fs.delete_file(path)
    storage.write_bytes_atomic(fs, inputs_path, json.dumps(inputs, indent=2, sort_keys=True).encode())


def _rejection(record: Record) -> str:
    """Why a record cannot be used, or "" when it can."""
    if not all(_encodes(value) for value in (record.id, record.group_id, record.text, record.question, record.answer)):
        return "invalid_text"  # a lone surrogate (JSON "\\ud800"): Parquet could not store it
    if record.split not in SPLITS and record.split not in ("", TRAIN_OR_VAL):
        return "malformed_row"
    if not record.text.strip() and not record.answer.strip():
        return "empty_target"
    if record.question and not record.answer.strip():
        return "empty_target"
    try:
        decode_image(record.image)
    except UnreadableImage:
        return "unreadable_image"
    return ""


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_manifest(location: str, endpoint_url: str = "") -> dict:
    fs, root = storage.filesystem_for(location, endpoint_url)
    path = storage.join(root, MANIFEST)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{location}: no {MANIFEST} (run `medvl prepare` first)")
    return json.loads(storage.read_bytes(fs, path))


def shard_paths(manifest: dict, location: str, split: str, endpoint_url: str = "") -> list[str]:
    """Paths (inside the location's filesystem) of one split's shards."""
    _, root = storage.filesystem_for(location, endpoint_url)
    return [storage.join(root, s["path"]) for s in manifest["shards"] if s["split"] == split]
