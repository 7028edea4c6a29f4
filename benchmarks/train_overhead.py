"""What Ray Train costs per step: the quickstart's model and data, trained through Ray and without it.

    python benchmarks/train_overhead.py [--steps 200] [--images 8000] [--warmup 30] [--set data.shuffle_buffer=0]

The same seeded tiny BLIP, the same shards, the same number of optimizer steps, twice:

(ray)   medvl's own train stage (``run_train_stage``: ``TorchTrainer`` with one DDP worker, Ray Data reading and
        preprocessing the shards in its actor, the per-worker loop of ``medvl/train/loop.py`` with its metering and
        progress posts), exactly as the quickstart runs it;
(plain) a plain PyTorch loop in this process: pyarrow reads the same shards one by one, the recipe's own
        preprocessor decodes and tokenises them, AdamW with the same warm-up + cosine schedule and clipping.

Step times are steady-state: the median over ``--interval``-step windows after ``--warmup`` steps. The Ray run's
windows are the ones its worker measures (``step_time_s`` of its progress posts, validation excluded); the plain
loop's are timed here the same way. The plain loop runs before and after the Ray run and its figure is the median
of both runs' windows, so that a change in the machine's background load during the Ray run biases the ratio
less (the load averages are printed; this machine is shared). ``--set`` overrides go to both runs' spec, to
attribute a cost (e.g. ``data.shuffle_buffer=0``: no local shuffle buffer in the Ray loop). Start-up is the time
from the call to the first optimizer step. Both loops use the torch threads the spec gives the Train worker. The
plain loop decodes in its own thread (it has no separate data process), so its step time includes decoding; the
Ray worker's data arrives from another process.

The last line is ``ratio X``: Ray step time / plain step time (a measurement, not a test).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as medvl's own local Ray (medvl/runtime.py)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quickstart_spec(work: Path, images: int, steps: int, interval: int, overrides: list[str]):
    from medvl.spec import load_spec

    return load_spec(ROOT / "jobs" / "quickstart.yaml", [
        f"output_dir={work / 'ray'}", f"data.shards={work / 'shards'}", f"data.synthetic_images={images}",
        f"train.max_steps={steps}", "train.epochs=100", "train.eval_every_steps=0",
        "train.early_stopping_patience=0", "train.max_val_batches=1", f"tracking.log_every_steps={interval}",
        "tracking.enabled=false", *overrides,
    ])


class StepTimes:
    """Stands in for the stage's MLflow log: keeps each progress post's step and ``step_time_s``."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, float]] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is not None and "step_time_s" in metrics:
            self.windows.append((step, metrics["step_time_s"]))


def steady(windows: list[tuple[int, float]], warmup: int) -> float:
    """Median seconds per step over the windows that end after the warm-up."""
    times = [seconds for step, seconds in windows if step > warmup] or [seconds for _, seconds in windows]
    return statistics.median(times)


def ray_run(spec, model_source: str) -> dict:
    """medvl's train stage under a local Ray; start-up from the call to the first step (the worker's record)."""
    import ray

    from medvl.spec import StageSpec
    from medvl.train.trainer import run_train_stage

    ray.init(address="local", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        log = StepTimes()
        started = time.perf_counter()
        outcome = run_train_stage(spec, StageSpec(kind="train", name="train"), start_from=model_source, log=log)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    summary = outcome.summary
    startup = summary.get("startup_s", {})
    return {"windows": log.windows, "steps": summary["steps"], "wall_s": wall, "startup": startup}


def plain_batches(spec, location: str, preprocess, seed: int):
    """Training batches (dicts of tensors) for ever: shards in a shuffled order, rows regrouped to the batch size."""
    import pyarrow.parquet as pq
    import torch

    from medvl.data.pipeline import PREPROCESS_BATCH_SIZE
    from medvl.data.shards import read_manifest, shard_paths

    paths = shard_paths(read_manifest(location), location, "train")
    order = random.Random(seed)
    size, pending = spec.train.batch_size, []
    while True:
        order.shuffle(paths)
        for path in paths:
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=PREPROCESS_BATCH_SIZE):
                columns = {k: np.asarray(v, dtype=object) for k, v in record_batch.to_pydict().items()}
                pending.append(preprocess(columns))
                rows = sum(len(p["pixel_values"]) for p in pending)
                while rows >= size:
                    merged = {k: np.concatenate([p[k] for p in pending]) for k in ("pixel_values", "input_ids",
                                                                                   "attention_mask")}
                    yield {k: torch.from_numpy(v[:size]) for k, v in merged.items()}
                    pending, rows = [{k: v[size:] for k, v in merged.items()}], rows - size


def plain_run(spec, model_source: str, steps: int, interval: int, threads: int) -> dict:
    import torch

    from medvl.models.registry import build_recipe
    from medvl.train.engines import _optimizer_and_scheduler

    started = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(spec.train.seed)
    recipe = build_recipe(spec)
    model = recipe.load_for_training(model_source).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer_and_scheduler(spec, trainable, steps)
    batches = plain_batches(spec, spec.shards_location, recipe.preprocessor(model_source), spec.train.seed)
    windows, first_step, clock, data_s = [], None, time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        fetched = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - fetched
        loss, _ = recipe.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, spec.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if first_step is None:
            first_step = time.perf_counter() - started
        if step % interval == 0:
            now = time.perf_counter()
            windows.append((step, (now - clock) / interval))
            clock = now
    return {"windows": windows, "steps": steps, "wall_s": time.perf_counter() - started,
            "startup": {"total": first_step}, "data_share": data_s / (time.perf_counter() - started)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (200: a quickstart epoch)")
    parser.add_argument("--images", type=int, default=0, help="synthetic images to prepare (0 = the quickstart's)")
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the steady-state figure")
    parser.add_argument("--interval", type=int, default=10, help="steps per timed window")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="spec override (both runs)")
    args = parser.parse_args(argv)

    from medvl.data.prepare import run_prepare_stage
    from medvl.models.registry import build_recipe
    from medvl.spec import load_spec
    from medvl.train.trainer import training_texts

    with tempfile.TemporaryDirectory(prefix="medvl-train-overhead-") as tmp:
        work = Path(tmp)
        images = args.images or load_spec(ROOT / "jobs" / "quickstart.yaml").data.synthetic_images
        spec = quickstart_spec(work, images, args.steps, args.interval, args.set)
        run_prepare_stage(spec)
        # Both runs start from this one folder: the same tokenizer and the same random weights.
        model_source = build_recipe(spec).initial_model(work / "base", lambda: training_texts(spec))
        threads = spec.train.torch_threads or max(1, int(np.ceil(spec.train.cpus_per_worker)))
        load = [os.getloadavg()[0]]
        plain = plain_run(spec, model_source, args.steps, args.interval, threads)
        load.append(os.getloadavg()[0])
        ray = ray_run(spec, model_source)
        load.append(os.getloadavg()[0])
        again = plain_run(spec, model_source, args.steps, args.interval, threads)
        load.append(os.getloadavg()[0])

    ray_step = steady(ray["windows"], args.warmup)
    plain_step = steady(plain["windows"] + again["windows"], args.warmup)
    before, after = steady(plain["windows"], args.warmup), steady(again["windows"], args.warmup)
    print("\n== Ray Train overhead per step ==")
    overrides = ", " + " ".join(args.set) if args.set else ""
    print(f"quickstart model and data, {args.steps} optimizer steps each, batch {spec.train.batch_size}, "
          f"{threads} torch thread(s), {os.cpu_count()} CPUs{overrides}; load average "
          f"{' / '.join(f'{x:.1f}' for x in load)} (start, after plain, after ray, after plain again)")
    startup = ", ".join(f"{k} {v:.1f} s" for k, v in ray["startup"].items() if k != "total")
    print(f"ray    step {ray_step * 1000:7.1f} ms  start-up to first step "
          f"{ray['startup'].get('total', float('nan')):5.1f} s ({startup})  wall {ray['wall_s']:.0f} s")
    print(f"plain  step {plain_step * 1000:7.1f} ms ({before * 1000:.1f} before the Ray run, {after * 1000:.1f} after)  "
          f"start-up to first step {plain['startup']['total']:5.1f} s  wall {plain['wall_s']:.0f} s  "
          f"(decoding {plain['data_share']:.0%} of it, in the training thread)")
    print(f"ratio {ray_step / plain_step:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
