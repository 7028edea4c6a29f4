"""Ray Data pipelines over prepared shards: streamed, decoded and tokenised in ``map_batches``.

Training gets these datasets through ``TorchTrainer(datasets=…)`` and reads its share with
``ray.train.get_dataset_shard``; eval iterates them on the driver. Nothing is materialised: a split larger
than memory streams through.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.fs as pafs
import ray.data

from medvl.data import storage
from medvl.data.position import ROW_KEY, SkipTrained, row_keys
from medvl.data.shards import read_manifest, shard_paths
from medvl.data.skips import ensure_skip_counter
from medvl.data.preprocessing import Batch

# A map_batches block this size keeps tokeniser/image-processor calls vectorised without holding much memory.
PREPROCESS_BATCH_SIZE = 64
READ_CPUS = 0.25


def read_split(location: str, split: str, endpoint_url: str = "", shuffle: str | None = None) -> ray.data.Dataset:
    """The raw shard rows of one split (all columns, images still encoded); ``shuffle="files"`` for training."""
    manifest = read_manifest(location, endpoint_url)
    paths = shard_paths(manifest, location, split, endpoint_url)
    if not paths:
        raise ValueError(f"{location}: split {split!r} has no shards (counts: {manifest['counts']})")
    fs, _ = storage.filesystem_for(location, endpoint_url)
    # The v2 read path adds a file-listing task that reserves a whole CPU; on a 2-CPU machine next to a Train
    # worker that starves the read forever. The classic path reads our explicit file list in one light task.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    # Read tasks reserve little CPU: Train workers and preprocessing actors hold the rest (see `preprocessed`).
    return ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, num_cpus=READ_CPUS)


def preprocessed(
    dataset: ray.data.Dataset,
    preprocessor_factory: Callable[[], Callable[[Batch], Batch]],
    concurrency: int = 1,
    num_cpus: float = 0.25,
    keep: list[str] | None = None,
    position_file: tuple[pafs.FileSystem, str] | None = None,
) -> ray.data.Dataset:
    """Decode + tokenise with a pool of ``concurrency`` actors, each holding one tokenizer/image processor.

    Actors reserve a fraction of a CPU by default: on a small machine the Train workers and these actors
    must not take every CPU, or Ray Data's read tasks never get scheduled and the run hangs.
    ``keep`` limits the output columns (training needs tensors only; a separate projection would cost a task);
    ``row_key`` in it adds each row's stable key. ``position_file`` (filesystem, path) names the training
    loop's record of rows already trained this epoch: the actors, built anew for each epoch, drop those rows
    before decoding them (see :mod:`medvl.data.position`).
    """
    ensure_skip_counter()
    return dataset.map_batches(
        _PreprocessActor,
        fn_constructor_args=(preprocessor_factory, keep, position_file),
        batch_size=PREPROCESS_BATCH_SIZE,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )


class _PreprocessActor:
    def __init__(self, factory: Callable[[], Callable[[Batch], Batch]], keep: list[str] | None,
                 position_file: tuple[pafs.FileSystem, str] | None = None):
        self.preprocess = factory()
        self.keep = keep
        self.skip_trained = SkipTrained(*position_file) if position_file else None

    def __call__(self, batch: Batch) -> Batch:
        rows = self.skip_trained(batch) if self.skip_trained else batch
        if len(rows["id"]) == 0:  # every row trained already: an empty block with the right columns and types
            return {name: values[:0] for name, values in self._process(_first_row(batch)).items()}
        return self._process(rows)

    def _process(self, batch: Batch) -> Batch:
        out = self.preprocess(batch)
        if self.keep and ROW_KEY in self.keep:
            out[ROW_KEY] = row_keys(out["id"])
        return {name: out[name] for name in self.keep} if self.keep else out


def preprocessed_here(location: str, split: str, preprocess: Callable[[Batch], Batch], keep: list[str],
                      endpoint_url: str = "") -> ray.data.Dataset:
    """One split decoded and tokenised in this process, held in Ray's object store as a materialised dataset.

    For splits small enough to keep whole and used many times (a search's trials): it starts no read task and no
    preprocessing actor, whose process would import the model's libraries before the first row (on a busy 2-CPU
    machine that start took minutes). ``keep`` as in :func:`preprocessed`, ``row_key`` included.
    """
    import pyarrow.parquet as pq

    manifest = read_manifest(location, endpoint_url)
    fs, _ = storage.filesystem_for(location, endpoint_url)
    blocks = []
    for path in shard_paths(manifest, location, split, endpoint_url):
        for record_batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=PREPROCESS_BATCH_SIZE):
            out = preprocess({k: np.asarray(v, dtype=object) for k, v in record_batch.to_pydict().items()})
            if ROW_KEY in keep:
                out[ROW_KEY] = row_keys(out["id"])
            if len(out["id"]):
                blocks.append({name: np.ascontiguousarray(out[name]) for name in keep})
    if not blocks:
        raise ValueError(f"{location}: split {split!r} has no rows to train on")
    return _from_blocks(blocks)


def _from_blocks(blocks: list[Batch]) -> ray.data.Dataset:
    """A materialised dataset with one block per preprocessed batch (columns of numpy arrays)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    tables = [pa.table({name: ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)
                        for name, values in block.items()}) for block in blocks]
    return ray.data.from_arrow(tables)


def _first_row(batch: Batch) -> Batch:
    return {name: np.asarray(values)[:1] for name, values in batch.items()}
