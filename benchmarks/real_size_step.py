"""One real-size training step on this CPU: BLIP-2 OPT-2.7B trains one LoRA optimizer step through medvl's Ray
Train loop, and its peak memory is set beside what ``medvl plan`` predicts for the same spec.

    python benchmarks/real_size_step.py              # the real architecture: ~8 GB of disk, ~10 GB of RAM
    python benchmarks/real_size_step.py --preset tiny  # the same path on the tiny BLIP-2, to check the plumbing

What runs (``medvl.stages.run_stages`` of the spec :func:`job` writes): prepare (16 synthetic radiographs and
their short reports) → train: the blip2 recipe's ``model.preset: random`` writes the published architecture of
``Salesforce/blip2-opt-2.7b`` (3.74 B weights) with random bf16 weights (7.5 GB of safetensors) and a tokenizer
trained on the reports; one Train worker loads it in bf16 (``model.dtype: bfloat16``) at 224 px, adds LoRA r 16
on the OPT q/k projections (5,242,880 fp32 weights) and takes one optimizer step on one image (forward,
backward through the frozen OPT, AdamW), then validates one batch and checkpoints the adapter.

Measured: the Train worker process's peak resident memory (``VmHWM``, the kernel's high-water mark, so no peak
is missed), beside its peak anonymous memory (``RssAnon``, sampled every 0.2 s), and this driver's peak (it
built and saved the random model). The high-water mark is the footprint: on CPU, transformers maps the
safetensors file and uses the bf16 weights in place (no copy), so the 7 GB of weights are resident *file*
pages, not anonymous ones. Printed: those, the wall time, the plan's prediction and, as the last line,
``plan/measured ratio X`` (the plan's memory for one worker over the worker's high-water mark).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
WORKER_MARK = "RayTrainWorker"  # in the process title Ray gives a Train worker


def job(work: Path, preset: str) -> dict:
    return {
        "name": "real_size_step",
        "output_dir": str(work / "run"),
        "stages": ["prepare", "train"],
        "data": {"format": "synthetic", "synthetic_images": 16, "synthetic_image_size": 256, "image_size": 224,
                 "max_text_length": 32, "records_per_shard": 16, "split_fractions": [0.5, 0.5, 0.0],
                 "shuffle_buffer": 0, "preprocess_workers": 1, "preprocess_cpus": 0.25},
        "model": {"recipe": "blip2", "preset": preset, "name_or_path": "Salesforce/blip2-opt-2.7b",
                  "dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "k_proj"]},
        "train": {"finetune": "lora", "epochs": 1, "max_steps": 1, "batch_size": 1, "grad_accum": 1, "workers": 1,
                  "cpus_per_worker": 1, "torch_threads": 2, "max_val_batches": 1, "val_batch_size": 1,
                  "early_stopping_patience": 0, "num_checkpoints_to_keep": 1, "use_gpu": False},
    }


class PeakWatcher(threading.Thread):
    """Polls this process's descendants whose title names ``mark``: the largest ``VmHWM`` (the kernel's peak of
    resident memory, file-backed pages included) and the largest ``RssAnon`` seen (anonymous memory: tensors,
    the Python heap; sampled, so a peak shorter than ``every_s`` may be missed)."""

    def __init__(self, mark: str, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.mark, self.every_s = mark, every_s
        self.high_water_bytes, self.anon_bytes, self.pids = 0, 0, set()
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.is_set():
            for process in me.children(recursive=True):
                try:
                    if self.mark in " ".join(process.cmdline()):
                        status = memory_status(process.pid)
                        self.high_water_bytes = max(self.high_water_bytes, status["VmHWM"])
                        self.anon_bytes = max(self.anon_bytes, status["RssAnon"])
                        self.pids.add(process.pid)
                except (psutil.Error, OSError, KeyError):
                    continue  # it ended between listing and reading
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def memory_status(pid: int) -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of /proc/<pid>/status, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def planned_bytes(spec) -> tuple[float, str]:
    """What ``medvl plan`` predicts one worker of ``spec`` needs (bytes), and what that covers."""
    from medvl.plan import plan_spec

    strategy = "ddp" if spec.train.strategy == "ddp" else f"zero{spec.train.deepspeed.stage}"
    plan = plan_spec(spec).memory_gib[strategy]
    return plan.total * GIB, (f"{strategy}: weights {plan.weights:.2f} + gradients {plan.gradients:.2f} + optimizer "
                              f"{plan.optimizer:.2f} + activations {plan.activations:.2f} GiB")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["random", "tiny"], default="random")
    parser.add_argument("--keep", action="store_true", help="keep the output folder (the random-init checkpoint)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from medvl.spec import parse_spec
    from medvl.stages import run_stages

    work = Path(tempfile.mkdtemp(prefix="medvl-real-size-step-"))
    spec = parse_spec(job(work, args.preset))
    ray.init(address="local", num_cpus=2, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    watcher = PeakWatcher(WORKER_MARK)
    watcher.start()
    started = time.perf_counter()
    try:
        run_stages(spec)
    finally:
        wall = time.perf_counter() - started
        watcher.stop()
        ray.shutdown()
    summary = json.loads((work / "run" / "train" / "train_summary.json").read_text())
    start_folder = Path(summary["model_source"])
    checkpoint_bytes = sum(f.stat().st_size for f in start_folder.glob("*.safetensors"))
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    measured = watcher.high_water_bytes
    print(f"model: Salesforce/blip2-opt-2.7b, preset {args.preset}, weights bf16, 224 px, batch 1, LoRA r 16 "
          f"(q_proj, k_proj), {summary['steps']} optimizer step, val loss {summary['best_val_loss']:.3f}")
    print(f"random-init checkpoint on disk: {checkpoint_bytes / GIB:.2f} GiB")
    print(f"wall time (prepare, build + save the model, load, step, validate, checkpoint): {wall:.0f} s")
    print(f"peak resident memory, driver (built and saved the model): {driver_peak / GIB:.2f} GiB")
    print(f"peak resident memory, Train worker ({len(watcher.pids)} process(es) seen): {measured / GIB:.2f} GiB "
          f"(high-water mark; the mapped bf16 weights are resident file pages), of which anonymous at most "
          f"{watcher.anon_bytes / GIB:.2f} GiB (Python, torch, LoRA, gradients, AdamW, activations; sampled)")
    if not measured:
        print("no Train worker process was seen: the measurement failed", file=sys.stderr)
        return 1
    if args.preset == "tiny":
        print("plan/measured ratio n/a (the plan is of the real architecture; --preset tiny checks the plumbing)")
        return 0
    planned, what = planned_bytes(spec)
    print(f"plan ({what}): {planned / GIB:.2f} GiB")
    print(f"plan/measured ratio {planned / measured:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
