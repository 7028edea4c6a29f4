"""Shard rows as a Ray Data ``map_batches`` call hands them to a preprocessor, for in-process recipe tests."""
from __future__ import annotations

import numpy as np


def shard_batch(records) -> dict[str, np.ndarray]:
    """``records`` (``medvl.data.records.Record``) as one numpy batch of object columns."""
    rows = [r.to_row() for r in records]
    return {key: np.asarray([row[key] for row in rows], dtype=object) for key in rows[0]}
