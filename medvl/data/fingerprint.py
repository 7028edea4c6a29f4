"""What a prepare's shards were made from, so that a rerun reuses them only when nothing changed.

Prepare is resumable: an interrupted run leaves finished shards behind and the rerun keeps them. That is only
right when the rerun would write the same rows. The *inputs* recorded here decide it:

* medvl's shard format version (:data:`SHARD_FORMAT_VERSION`, raised whenever a shard's rows would differ for
  the same source: a new column, a new cleaning rule);
* the dataset format and the data settings that shape rows and their split (seed, split fractions, language,
  leakage check, shard size; the synthetic generator's own settings);
* the source: its absolute path and a digest of its listing, every file's relative path, size and
  modification time (not the contents: hashing a 500 GB image folder would cost more than preparing it).
  A file edited in place within the filesystem's timestamp resolution and to the same size goes unnoticed.

The inputs are written next to the shards (``prepare_inputs.json``) before the first shard and repeated in the
manifest. A rerun compares: the same inputs resume; other inputs (or shards from a medvl that did not record
them) mean the old shards are deleted and everything is rebuilt, and the log says which input changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medvl.spec import FORMAT_OPTIONS, DataSpec

SHARD_FORMAT_VERSION = 2  # 2: leakage report, train|val carving, filtered/repaired counts, path checks
INPUTS_FILE = "prepare_inputs.json"


def prepare_inputs(data: DataSpec) -> dict:
    """The inputs of a prepare with these settings (reads the source's listing)."""
    settings = {
        "seed": data.seed,
        "split_fractions": list(data.split_fractions),
        "records_per_shard": data.records_per_shard,
        "leakage_check": data.leakage_check,
        "language": data.language,
    }
    if data.format != "synthetic":  # the dataset filters and the split choice change which rows land where
        settings.update({name: getattr(data, name) for name in FORMAT_OPTIONS}, resplit=data.resplit)
    if data.format == "synthetic":
        settings.update(task=data.task, synthetic_images=data.synthetic_images,
                        synthetic_image_size=data.synthetic_image_size)
        source = {"path": "synthetic"}
    else:
        source = {"path": str(Path(data.source).resolve()), **listing_digest(Path(data.source))}
    return {"shard_format": SHARD_FORMAT_VERSION, "format": data.format, "settings": settings, "source": source}


def listing_digest(root: Path) -> dict:
    """{"files", "bytes", "listing_sha256"} over every file under ``root`` (symlinked folders not followed)."""
    digest, files, total = hashlib.sha256(), 0, 0
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:  # a dangling symlink: part of the listing all the same
                size, mtime = -1, -1
            else:
                size, mtime = stat.st_size, stat.st_mtime_ns
            relative = path.relative_to(root).as_posix()
            digest.update(f"{relative}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            files, total = files + 1, total + max(size, 0)
    return {"files": files, "bytes": total, "listing_sha256": digest.hexdigest()}


def changed_inputs(before: dict | None, now: dict) -> list[str]:
    """What differs, in words: ["settings.seed", "source files"…]; [] when nothing does."""
    if not before:
        return ["no record of the inputs (shards from an older medvl, or not medvl's)"]
    changes = []
    for key in ("shard_format", "format"):
        if before.get(key) != now.get(key):
            changes.append(f"{key} {before.get(key)!r} → {now.get(key)!r}")
    old_settings, new_settings = before.get("settings", {}), now.get("settings", {})
    changes += [f"settings.{key} {old_settings.get(key)!r} → {new_settings.get(key)!r}"
                for key in sorted(set(old_settings) | set(new_settings))
                if old_settings.get(key) != new_settings.get(key)]
    old_source, new_source = before.get("source", {}), now.get("source", {})
    if old_source.get("path") != new_source.get("path"):
        changes.append(f"source {old_source.get('path')!r} → {new_source.get('path')!r}")
    elif old_source != new_source:
        changes.append(f"source files ({old_source.get('files')} files, {old_source.get('bytes')} bytes → "
                       f"{new_source.get('files')} files, {new_source.get('bytes')} bytes, or their times)")
    return changes


def inputs_digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
