"""The same grid searched twice in one run, with ASHA and without (every trial to its end), on the tiny BLIP-2.

    python benchmarks/tune_asha.py                 # 6 trials (LoRA rank × learning rate), up to 12 steps each
    python benchmarks/tune_asha.py --concurrency 1
    python benchmarks/tune_asha.py --trainer torch    # every trial under a TorchTrainer (the path before issue 18)
    python benchmarks/tune_asha.py --max-steps 48     # longer trials: the fixed part weighs less

Prints the total optimizer steps trained over all trials and the wall time of each search, their ratios
(ASHA / full), whether both searches found the same best config, and each trial's start-up: the time from the
trial function's start to its first optimizer step (median and max over all trials of both searches), split
as the training loop records it (``medvl.train.reporting.StartupClock``: imports, driver side, worker group
when a ``TorchTrainer`` runs the trial, model, Ray Data's first batch, first step). One-worker trials train in the
trial's own process (``medvl.tune.trial``); ``--trainer torch`` runs them under a ``TorchTrainer`` instead, to
compare. Shards are prepared once and shared, and each search builds the same seeded tiny base model, so the two
differ only in the scheduler. An untimed one-trial search runs first (``--no-warmup`` skips it): otherwise the
first timed search alone pays the driver's imports and Ray's first worker starts.

Each search's wall time is a fixed part (the same for ASHA and the full search: Tune's start, a new process per
concurrent trial importing the model code, the exports) plus a part that grows with the trial-steps trained. From
the two searches' walls and step counts the script solves for both and prints them, with the fixed part a wall
ratio of 0.6 would allow at this size.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from medvl.runs import SEARCH_DIR

SPACE = {"model.lora_r": {"grid": [2, 8]}, "train.lr": {"grid": [3e-2, 3e-3, 3e-4]}}


def job(work: Path, scheduler: str, concurrency: int, max_steps: int = 12) -> dict:
    return {
        "name": f"tune_{scheduler}",
        "output_dir": str(work / scheduler),
        "stages": ["tune"],
        "data": {"format": "synthetic", "shards": str(work / "shards"), "synthetic_images": 160,
                 "synthetic_image_size": 48, "image_size": 32, "max_text_length": 40, "records_per_shard": 80,
                 "shuffle_buffer": 0, "preprocess_cpus": 0.1},
        "model": {"recipe": "blip2_lora", "preset": "tiny", "lora_dropout": 0.0},
        "train": {"finetune": "lora", "epochs": 2 * math.ceil(max_steps / 12), "batch_size": 16,
                  "cpus_per_worker": 0.25, "eval_every_steps": 3, "max_val_batches": 1, "early_stopping_patience": 0},
        "tune": {"space": str(work / "space.yaml"), "scheduler": scheduler, "grace_period": 3, "reduction_factor": 2,
                 "max_steps": max_steps, "max_concurrent_trials": concurrency},
    }


def read_rows(tune_dir: Path) -> list[dict]:
    with open(tune_dir / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def trial_startups(tune_dir: Path) -> list[dict[str, float]]:
    """Each trial's start-up split, from the first result it reported to Tune (its ``result.json``), with
    ``fresh`` 1.0 for the first trial of its process (Tune reuses a trial's process for the next when trials train
    in process: that one paid the imports)."""
    startups, pids = [], set()
    for result_file in sorted((tune_dir / SEARCH_DIR).glob("*/result.json")):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            if result.get("startup_s"):
                startups.append(result["startup_s"] | {"fresh": float(result.get("pid") not in pids)})
                pids.add(result.get("pid"))
                break
    return startups


def print_startups(startups: list[dict[str, float]]) -> None:
    if not startups:
        print("trial start-up          (no trial reported one)")
        return
    totals = [s["total"] for s in startups]
    parts = [k for k in startups[0] if k not in ("total", "fresh")]
    split = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in startups):.1f}" for k in parts)
    print(f"trial start-up          median {statistics.median(totals):.1f} s, max {max(totals):.1f} s over "
          f"{len(totals)} trials (medians, s: {split})")
    fresh = [s["total"] for s in startups if s["fresh"]]
    if len(fresh) < len(startups):
        print(f"                        of which {len(fresh)} in a new process (the rest reused one): median "
              f"{statistics.median(fresh):.1f} s, max {max(fresh):.1f} s")


def print_fixed_part(asha: dict, full: dict, target: float = 0.6) -> None:
    """Solve wall = fixed + per_step × trial-steps from the two searches, and the fixed part ``target`` allows."""
    extra_steps = full["steps"] - asha["steps"]
    if extra_steps <= 0:
        return
    per_step = (full["wall_s"] - asha["wall_s"]) / extra_steps
    if per_step <= 0:
        print(f"wall = fixed + per step × trial-steps: the full search's {extra_steps} extra trial-steps took no "
              "measurable time beside the two searches' noise: the fixed part is nearly all of each wall")
        return
    fixed = asha["wall_s"] - per_step * asha["steps"]
    allowed = per_step * (target * full["steps"] - asha["steps"]) / (1 - target)
    print(f"wall = fixed + per step × trial-steps: fixed {fixed:.1f} s per search, {per_step:.3f} s per trial-step; "
          f"a wall ratio of {target} at this size needs the fixed part under {max(allowed, 0):.1f} s")


def warm_up(work: Path, concurrency: int) -> float:
    """One trial of 3 steps, so that neither timed search pays what only the first search in a process pays: the
    driver's imports of the model code, peft and matplotlib, and Ray's first worker processes. Its seconds."""
    from medvl.spec import parse_spec
    from medvl.tune.stage import run_tune_stage

    (work / "warmup_space.yaml").write_text(yaml.safe_dump({"train.lr": {"grid": [3e-3]}}))
    raw = job(work, "warmup", concurrency)
    raw["tune"] |= {"space": str(work / "warmup_space.yaml"), "scheduler": "none", "max_steps": 3}
    spec = parse_spec(raw)
    started = time.perf_counter()
    run_tune_stage(spec, spec.stages[0])
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once (2 fit a 2-CPU machine)")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed one-trial search that first pays the driver's imports and Ray's "
                             "first worker starts (then the first timed search pays them)")
    parser.add_argument("--trainer", choices=("auto", "torch"), default="auto",
                        help="auto: one-worker trials train in their own process; torch: under a TorchTrainer")
    parser.add_argument("--max-steps", type=int, default=12,
                        help="optimizer steps of a trial that runs to its end (12: the shipped benchmark)")
    parser.add_argument("--first", choices=("asha", "none"), default="asha",
                        help="which search runs first (the first pays Ray Train's cold start in this Ray)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as medvl's own local Ray (medvl/runtime.py)
    import ray

    from medvl.data.prepare import run_prepare_stage
    from medvl.spec import parse_spec
    from medvl.tune import stage as tune_stage
    from medvl.tune.stage import run_tune_stage

    if args.trainer == "torch":
        tune_stage.runs_in_trial = lambda example, searched: False

    work = Path(tempfile.mkdtemp(prefix="medvl-tune-asha-"))
    (work / "space.yaml").write_text(yaml.safe_dump(SPACE))
    ray.init(num_cpus=2, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    figures, startups = {}, []
    try:
        prepare = parse_spec(job(work, "asha", args.concurrency) | {"stages": ["prepare"]})
        run_prepare_stage(prepare)
        if not args.no_warmup:
            figures["warmup_s"] = warm_up(work, args.concurrency)
        for scheduler in (("asha", "none") if args.first == "asha" else ("none", "asha")):
            spec = parse_spec(job(work, scheduler, args.concurrency, args.max_steps))
            started = time.perf_counter()
            summary = run_tune_stage(spec, spec.stages[0])
            wall = time.perf_counter() - started
            rows = read_rows(work / scheduler / "tune")
            startups += trial_startups(work / scheduler / "tune")
            figures[scheduler] = {
                "wall_s": wall,
                "trials": len(rows),
                "steps": sum(int(r["steps"]) for r in rows),
                "stopped_early": sum(r["stopped_early"] == "True" for r in rows),
                "best": {k: summary["best_config"][k] for k in sorted(summary["best_config"])},
                "best_val_loss": summary["best_val_loss"],
            }
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    asha, full = figures["asha"], figures["none"]
    print("\n== ASHA vs every trial to its end ==")
    for name, f in (("ASHA", asha), ("full", full)):
        print(f"{name:<5} {f['trials']} trials, {f['stopped_early']} stopped early, {f['steps']} trial-steps, "
              f"wall {f['wall_s']:.0f} s, best {f['best']} (val_loss {f['best_val_loss']:.4f})")
    print(f"trial-steps ASHA/full  {asha['steps'] / full['steps']:.2f}")
    if "warmup_s" in figures:
        print(f"(before both, untimed: a 1-trial warm-up search, {figures['warmup_s']:.0f} s)")
    print(f"wall time   ASHA/full  {asha['wall_s'] / full['wall_s']:.2f}")
    print(f"same best config       {asha['best'] == full['best']}")
    print_fixed_part(asha, full)
    print_startups(startups)
    where = "under a TorchTrainer" if args.trainer == "torch" else "as medvl decides (one CPU worker: in process)"
    print(f"trials trained          {where}")
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) at the end")
    if args.keep:
        print(f"outputs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
