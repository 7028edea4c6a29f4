"""Does ingest keep up with training? Prints rows/s of three consumers of the same shards (a measurement, not a test).

    python benchmarks/ingest.py [--images N] [--image-size PX] [--steps 30]   # default: the quickstart's data

(a) the Ray Data pipeline training uses (``read_split`` + ``preprocessed`` with the tiny BLIP preprocessor, as
    many actors and CPUs as the quickstart spec reserves), iterated to the end with ``iter_batches``;
(b) a plain single-process loop: pyarrow reads each shard, the same preprocessor callable decodes/tokenises;
(c) the training step's appetite: samples/s of a tiny BLIP forward + backward + AdamW step at the quickstart's
    batch size and torch threads, in-process on batches already preprocessed (median step time).

(a)/(c) > 1 means the pipeline outpaces the model. Each is measured alone; in a real run they share the CPUs.
(a) is timed from the first ``iter_batches`` call over one whole epoch of the quickstart's training split (by
default), so it includes the actor start-up every epoch pays, spread over the rows an epoch really has; a
smaller ``--images`` makes the start-up weigh more. (a)/(b) is per CPU: the pipeline's actor reserves
``data.preprocess_cpus`` but runs one Python thread, as (b) does.
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def prepare(spec, images: int, image_size: int, location: Path) -> dict:
    from medvl.data.shards import write_shards
    from medvl.data.synthetic import synthetic_records

    records = synthetic_records(images, seed=0, image_size=image_size, task="caption")
    return write_shards(records, str(location), source="synthetic", format="synthetic",
                        records_per_shard=spec.data.records_per_shard)


def ray_data_rate(spec, location: str, factory) -> tuple[int, float, float]:
    """Rows, seconds to the end, seconds to the first batch."""
    import ray

    from medvl.data.pipeline import preprocessed, read_split

    ray.init(log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        dataset = preprocessed(read_split(location, "train"), factory,
                               concurrency=spec.data.preprocess_workers, num_cpus=spec.data.preprocess_cpus)
        rows, first = 0, None
        started = time.perf_counter()
        for batch in dataset.iter_batches(batch_size=spec.train.batch_size, batch_format="numpy"):
            first = first or time.perf_counter() - started
            rows += len(batch["pixel_values"])
        return rows, time.perf_counter() - started, first
    finally:
        ray.shutdown()


def plain_loop_rate(location: str, preprocess) -> tuple[list[dict], float]:
    """Every preprocessed batch and the seconds it took, reading the shards one after the other."""
    import pyarrow.parquet as pq

    from medvl.data.pipeline import PREPROCESS_BATCH_SIZE
    from medvl.data.shards import read_manifest, shard_paths

    paths = shard_paths(read_manifest(location), location, "train")
    out = []
    started = time.perf_counter()
    for path in paths:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=PREPROCESS_BATCH_SIZE):
            columns = record_batch.to_pydict()
            out.append(preprocess({k: np.asarray(v, dtype=object) for k, v in columns.items()}))
    return out, time.perf_counter() - started


def training_rate(spec, recipe, model_source: str, batches: list[dict], steps: int, threads: int) -> float:
    """Samples/s of full optimizer steps (forward, backward, clip, AdamW) at the spec's batch size.

    From the median step time: on a shared machine a burst of someone else's work stalls a few steps, and
    torch's threads stall badly when the cores are oversubscribed.
    """
    import statistics

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = recipe.load_for_training(model_source).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    size = spec.train.batch_size
    tensors = {k: torch.as_tensor(np.concatenate([b[k] for b in batches])) for k in recipe.tensor_columns}
    rows = len(tensors["pixel_values"])

    def step(i: int) -> None:
        start = (i * size) % (rows - size + 1)
        loss, _ = recipe.loss(model, {k: v[start:start + size] for k, v in tensors.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, spec.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up: first calls allocate and pick kernels
        step(i)
    times = []
    for i in range(steps):
        started = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=0, help="synthetic images (0 = the quickstart's)")
    parser.add_argument("--image-size", type=int, default=0, help="pixels (0 = the quickstart's)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps for (c)")
    parser.add_argument("--torch-threads", type=int, default=0, help="for (c); 0 = the quickstart's train.torch_threads")
    parser.add_argument("--preprocessor", choices=("pipeline", "recipe"), default="pipeline",
                        help="pipeline: what training's pipeline runs (the recipe's torch-free form where it has "
                             "one); recipe: recipe.preprocessor, built from transformers (the actor imports torch)")
    args = parser.parse_args()

    from medvl.models.cache import preprocessor_for
    from medvl.models.registry import build_recipe
    from medvl.spec import load_spec
    from medvl.train.trainer import training_texts

    quickstart = load_spec(ROOT / "jobs" / "quickstart.yaml").data
    args.images = args.images or quickstart.synthetic_images
    args.image_size = args.image_size or quickstart.image_size
    with tempfile.TemporaryDirectory(prefix="medvl-ingest-") as tmp:
        spec = load_spec(ROOT / "jobs" / "quickstart.yaml", [
            f"output_dir={tmp}", f"data.image_size={args.image_size}",
            f"data.synthetic_image_size={args.image_size}", f"data.synthetic_images={args.images}",
        ])
        location = spec.shards_location
        started = time.perf_counter()
        manifest = prepare(spec, args.images, args.image_size, Path(location))
        print(f"prepared {sum(manifest['counts'].values())} images at {args.image_size} px into "
              f"{len(manifest['shards'])} shards in {time.perf_counter() - started:.1f} s; "
              f"measuring the train split ({manifest['counts']['train']} rows)")
        recipe = build_recipe(spec)
        model_source = recipe.initial_model(Path(tmp), lambda: training_texts(spec))
        factory = (recipe.preprocessor_factory(model_source) if args.preprocessor == "pipeline"
                   else functools.partial(preprocessor_for, recipe, model_source))

        rows, seconds, first = ray_data_rate(spec, location, factory)
        ray_rate = rows / seconds
        steady = (rows - spec.train.batch_size) / (seconds - first) if seconds - first > 1 else float("nan")
        preprocess = factory()
        batches, plain_seconds = plain_loop_rate(location, preprocess)
        plain_rows = sum(len(b["pixel_values"]) for b in batches)
        plain_rate = plain_rows / plain_seconds
        threads = args.torch_threads or spec.train.torch_threads or 1
        train_rate = training_rate(spec, recipe, model_source, batches, args.steps, threads)

    data = spec.data
    print(f"\n== ingest benchmark ({type(preprocess).__name__}) ==")
    print(f"(a) Ray Data read_split + preprocessed   {ray_rate:8.0f} rows/s  ({rows} rows in {seconds:.1f} s, "
          f"first batch after {first:.1f} s, {steady:.0f} rows/s after it; {data.preprocess_workers} actor × "
          f"{data.preprocess_cpus:g} CPU)")
    print(f"(b) plain single-process loop            {plain_rate:8.0f} rows/s  ({plain_rows} rows in {plain_seconds:.1f} s)")
    print(f"(c) tiny BLIP training step               {train_rate:8.0f} samples/s  (batch {spec.train.batch_size}, "
          f"{threads} torch threads, median of {args.steps} steps)")
    print(f"(a)/(b) {ray_rate / plain_rate:.2f} ({steady / plain_rate:.2f} after the first batch)   "
          f"(a)/(c) {ray_rate / train_rate:.2f}   on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
