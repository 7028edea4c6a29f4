"""Write records into Parquet shards plus a ``manifest.json``, resumably and without patient leakage.

Layout of a shard location (local folder or ``s3://`` prefix)::

    train-00000.parquet  train-00001.parquet  val-00000.parquet  test-00000.parquet  manifest.json

Design choices:

* **Streaming.** Records are buffered per split only up to ``records_per_shard``; a dataset larger than
  memory is fine.
* **Deterministic.** The reader order is deterministic and a record's split is a hash of
  ``(seed, group_id)`` when the dataset has no split of its own, so shard *k* of a split always holds the
  same records. A rerun after a crash therefore skips shards that already exist (each was written
  atomically) and produces the same manifest as an uninterrupted run, without duplicating or losing rows.
* **Visible once complete.** Shards are written atomically and the manifest last; readers go through the
  manifest, so a half-prepared location is never read.
* **No leakage.** Splits are grouped by ``group_id`` (patient, or study): a group seen in two splits, which
  can only happen when the dataset's own split leaks, aborts prepare before the manifest is written.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medvl.data import storage
from medvl.data.images import UnreadableImage, decode_image
from medvl.data.records import SHARD_COLUMNS, SPLITS, Record, ReaderItem, Skipped

MANIFEST = "manifest.json"

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


class LeakageError(RuntimeError):
    """The same patient/study group would land in two splits."""


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
        if storage.exists(self.fs, path):  # written by an earlier, interrupted run: same rows by construction
            data = storage.read_bytes(self.fs, path)
            self.reused += 1
        else:
            data = _parquet_bytes(rows)
            storage.write_bytes_atomic(self.fs, path, data)
        self.shards.append(
            {"path": name, "split": split, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        )


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
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Validate and write every record; return the manifest (also written to ``<location>/manifest.json``).

    ``progress(rows read, rows skipped)`` is called every 100 source rows."""
    fractions = split_fractions or [0.8, 0.1, 0.1]
    fs, root = storage.filesystem_for(location, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(root, recursive=True)
    writer = ShardWriter(fs, root, records_per_shard)
    counts: Counter = Counter()
    skipped: Counter = Counter()
    group_split: dict[str, str] = {}
    groups_per_split: Counter = Counter()
    seen = 0
    for item in items:
        seen += 1
        if progress and seen % 100 == 0:
            progress(seen, sum(skipped.values()))
        if isinstance(item, Skipped):
            skipped[item.reason] += 1
            continue
        reason = _rejection(item)
        if reason:
            skipped[reason] += 1
            continue
        item.split = item.split or assign_split(item.group_id, seed, fractions)
        previous = group_split.setdefault(item.group_id, item.split)
        if previous != item.split:
            raise LeakageError(
                f"group {item.group_id!r} (patient/study) is in both {previous!r} and {item.split!r}: "
                "refusing to write a leaking split"
            )
        counts[item.split] += 1
        writer.add(item)
    writer.close()
    for split in group_split.values():
        groups_per_split[split] += 1
    manifest = {
        "source": source,
        "format": format,
        "seed": seed,
        "split_fractions": fractions,
        "counts": {split: counts.get(split, 0) for split in SPLITS},
        "groups": {split: groups_per_split.get(split, 0) for split in SPLITS},
        "skipped": dict(sorted(skipped.items())),
        "shards": writer.shards,
    }
    storage.write_bytes_atomic(
        fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode()
    )
    manifest["_reused_shards"] = writer.reused  # not persisted: differs between a fresh run and a resume
    return manifest


def _rejection(record: Record) -> str:
    """Why a record cannot be used, or "" when it can."""
    if not record.text.strip() and not record.answer.strip():
        return "empty_target"
    if record.question and not record.answer.strip():
        return "empty_target"
    try:
        decode_image(record.image)
    except UnreadableImage:
        return "unreadable_image"
    return ""


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
