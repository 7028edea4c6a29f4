"""The data layer's name for :mod:`medvl.storage` (shards, positions and pipelines reach their files through it).

The filesystem helpers moved down to :mod:`medvl.storage` so that the run layout (:mod:`medvl.runs`, below the
data layer) can put a whole ``output_dir`` on object storage with them too.
"""
from __future__ import annotations

from medvl.storage import (
    Location,
    exists,
    filesystem_for,
    is_remote,
    is_s3,
    join,
    read_bytes,
    write_bytes_atomic,
)

__all__ = ["Location", "exists", "filesystem_for", "is_remote", "is_s3", "join", "read_bytes", "write_bytes_atomic"]
