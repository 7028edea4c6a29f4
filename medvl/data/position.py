"""Where training is inside an epoch, so that a resumed run trains each sample of the epoch exactly once.

Ray Data streams an epoch with no notion of "row 5,312"; order and the split between workers differ between
runs. So the position is kept as the set of rows already trained in the current epoch, identified by a
stable 63-bit key of each row's ``id`` (:func:`row_keys`). Every worker records the keys of the rows it
trains; at each checkpoint the keys of all workers are gathered into the checkpoint.

On resume the loop writes that set to a *position file* before it starts iterating the epoch again, and
the preprocessing actors (which Ray Data builds anew for every epoch) drop those rows before decoding them.
The filter runs before ``streaming_split``, so every worker still gets an equal share of what is left and
the workers take the same number of optimizer steps (a filter inside each worker would not: one worker
could be left with more unseen rows than another, and DDP would hang).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pyarrow.fs as pafs

from medvl.data import storage

ROW_KEY = "row_key"
POSITION_FILE = "data_position.json"


def row_keys(ids: Iterable) -> np.ndarray:
    """A stable int64 (≥ 0) per row id: the first 8 bytes of its BLAKE2b digest, top bit cleared."""
    keys = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") & (2**63 - 1)
        for i in ids
    ]
    return np.asarray(keys, dtype=np.int64)


def write_position(fs: pafs.FileSystem, path: str, seen: Iterable[int]) -> None:
    """Replace the position file (atomically) with the keys already trained in the current epoch."""
    storage.write_bytes_atomic(fs, path, json.dumps(sorted(int(k) for k in seen)).encode())


def read_position(fs: pafs.FileSystem, path: str) -> set[int]:
    return set(json.loads(storage.read_bytes(fs, path))) if storage.exists(fs, path) else set()


class SkipTrained:
    """Built with the preprocessing actor at the start of each epoch's pipeline: drops rows already trained.

    It gets the filesystem object itself (pickled with its S3 keys and endpoint), not a URL: the actor's process
    need not have the driver's credentials in its environment.
    """

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.seen = read_position(fs, path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.seen:
            return batch
        keep = ~np.isin(row_keys(batch["id"]), np.fromiter(self.seen, dtype=np.int64))
        return batch if keep.all() else {name: np.asarray(values)[keep] for name, values in batch.items()}
