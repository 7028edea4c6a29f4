"""GPU throughput of BLIP-2 OPT-2.7B fine-tuning: samples/s, tokens/s, peak memory and MFU (a measurement, not a test).

Two configurations of jobs/mimic_blip2_lora.yaml, each on one GPU and on all GPUs of the node:

* ``lora``       LoRA r 16 on the OPT q/k projections (5,242,880 trainable); frozen base in bf16, fp32 adapters,
                 bf16 autocast, torch AdamW; DDP across GPUs (medvl's DDP engine does the same).
* ``full_zero3`` every weight trains; DeepSpeed ZeRO-3 in bf16 with the config medvl derives from the spec
                 (:func:`medvl.train.deepspeed_config.deepspeed_config`) and torch AdamW.

The model is ``model.preset: random``: the published architecture (:mod:`medvl.models.architectures`) with random
weights (:func:`medvl.models.random_preset.build_random`), built in bf16 straight on the GPU; throughput and
memory do not depend on what the weights are. Batches are synthetic: random 224 px images and
``[image]×32 [bos] 160 tokens [eos]`` sequences (194 LM tokens), the spec's shapes. The first ``--warmup`` steps
(allocator growth, cuDNN autotuning, NCCL setup) are not timed.

Why a per-GPU process loop (``torch.multiprocessing.spawn``, NCCL over 127.0.0.1) rather than torchrun or Ray
Train: it runs unchanged with ``python benchmarks/gpu_throughput.py`` on one node of 1-8 GPUs, needs no launcher
and no Ray cluster, and times the training step alone: Ray Train's worker start (~17 s here) and the Ray Data
pipeline would blur a step-level figure. What Ray adds around the step is measured by the other benchmarks.

Reported, per configuration and GPU count:

* samples/s = GPUs × batch × timed steps / the slowest rank's wall time; tokens/s = samples/s × 194;
* peak memory = the largest ``torch.cuda.max_memory_allocated`` over ranks (and reserved, which is what
  ``nvidia-smi`` shows minus the CUDA context), after the model was built;
* MFU = samples/s × training FLOPs per sample / (GPUs × the card's dense bf16 peak). FLOPs per sample come
  from :func:`medvl.plan.training_flops` on the same spec: 6 per weight per token when it trains, 4 for a
  frozen weight gradients flow through (the LoRA base), 2 for a frozen tower nothing before trains (the ViT and
  Q-Former under LoRA), plus attention scores. Recomputation under ``--gradient-checkpointing`` is not counted
  (that would be hardware FLOPs utilisation), so checkpointing lowers MFU by design.

Peaks (dense bf16, TFLOP/s): H100 SXM and H200 989, H100 PCIe 756, A100 312, A10/A10G 125, L4 121; any other
card needs ``--peak-tflops``. ``medvl plan jobs/mimic_blip2_lora.yaml --gpus N`` prints the memory the planner
expects for the same runs, for comparison.

Exit codes: 0 measured; 3 no CUDA device on this machine (the message says so; nothing ran); 2 an unknown card
without ``--peak-tflops``.

    python benchmarks/gpu_throughput.py                           # both configurations, 1 GPU and all GPUs
    python benchmarks/gpu_throughput.py --configs lora --gpus 1 --steps 20 --json-out runs/gpu_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "jobs" / "mimic_blip2_lora.yaml"
NO_CUDA_EXIT = 3
UNKNOWN_CARD_EXIT = 2
CONFIGS = {"lora": ["train.finetune=lora"], "full_zero3": ["train.finetune=full", "train.strategy=deepspeed",
                                                          "train.deepspeed.stage=3"]}
#: Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name() in this order.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.0),
    (("H100", "PCIe"), 756.0),
    (("H100",), 989.0),
    (("A100",), 312.0),
    (("A10",), 125.0),  # A10 and A10G
    (("L4",), 121.0),
]


@dataclass
class RankResult:
    seconds: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    final_loss: float


@dataclass
class Measurement:
    config: str
    gpus: int
    batch_per_gpu: int
    gradient_checkpointing: bool
    steps: int
    samples_per_s: float
    tokens_per_s: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    train_flops_per_sample: float
    mfu: float
    planned_gib: float  # medvl plan's total for this strategy and GPU count


def peak_tflops(device_name: str) -> float | None:
    for parts, tflops in PEAK_TFLOPS:
        if all(part in device_name for part in parts):
            return tflops
    return None


def job_spec(config: str, batch: int, checkpointing: bool, gpus: int):
    from medvl.spec import load_spec

    overrides = [*CONFIGS[config], f"train.batch_size={batch}", "train.grad_accum=1", "train.use_gpu=true",
                 f"train.workers={gpus}", f"train.gradient_checkpointing={str(checkpointing).lower()}",
                 "model.preset=random", "model.dtype=bfloat16", "train.precision=bf16"]
    return load_spec(SPEC, overrides)


def synthetic_batch(spec, config, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random images and ``[image]×Q [bos] tokens… [eos]`` ids at the spec's shapes; labels mask the image tokens."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    queries, text = config.num_query_tokens, spec.data.max_text_length
    body = torch.randint(3, config.image_token_index, (batch, text + 2), generator=generator)
    body[:, 0], body[:, -1] = config.text_config.bos_token_id, config.text_config.eos_token_id
    ids = torch.cat([torch.full((batch, queries), config.image_token_index), body], dim=1)
    labels = ids.masked_fill(ids == config.image_token_index, -100)
    pixels = torch.randn(batch, 3, spec.data.image_size, spec.data.image_size, generator=generator)
    return {"pixel_values": pixels.to(device, torch.bfloat16), "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def build_model(spec, device: torch.device) -> torch.nn.Module:
    """``model.preset: random`` built on the GPU in bf16, with the spec's policy (the recipe's own functions)."""
    from peft import get_peft_model
    from transformers import Blip2ForConditionalGeneration

    from medvl.models.blip2 import apply_blip2_policy
    from medvl.models.lora import lora_config, scoped_targets, target_modules
    from medvl.models.precision import keep_trainable_in_fp32
    from medvl.models.random_preset import build_random, real_config

    config = real_config(spec.model.name_or_path)
    with torch.device(device):
        model = build_random(Blip2ForConditionalGeneration, config, torch.bfloat16, seed=spec.train.seed)
        if spec.train.finetune == "lora":
            targets = target_modules(spec.model, config.text_config.model_type)
            model = get_peft_model(model, lora_config(spec.model, scoped_targets("language_model", targets)))
        else:
            apply_blip2_policy(model, spec.train.finetune)
    if spec.train.checkpoints_activations:
        from medvl.models.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if spec.train.strategy == "ddp":
        keep_trainable_in_fp32(model)  # as medvl's DDP engine: fp32 adapters and AdamW state, bf16 frozen base
    return model


def run_rank(rank: int, world: int, port: int, config_name: str, args: argparse.Namespace, results) -> None:
    """One GPU's process: build, wrap (DDP or DeepSpeed ZeRO-3), warm up, time ``args.steps`` steps."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    spec = job_spec(config_name, args.batch_size, args.gradient_checkpointing, world)
    model = build_model(spec, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)  # as medvl's engines: torch AdamW, nothing to compile
    if spec.train.strategy == "deepspeed":
        import deepspeed

        from medvl.train.deepspeed_config import deepspeed_config

        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                       config=deepspeed_config(spec, world))

        def step(batch):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank]) if world > 1 else model

        def step(batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = wrapped(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, spec.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    blip2_config = getattr(model, "get_base_model", lambda: model)().config
    batch = synthetic_batch(spec, blip2_config, args.batch_size, device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(batch)
    torch.cuda.synchronize(device)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step(batch)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    results.put((rank, asdict(RankResult(seconds, torch.cuda.max_memory_allocated(device) / 2**30,
                                         torch.cuda.max_memory_reserved(device) / 2**30, float(loss)))))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(config_name: str, gpus: int, args: argparse.Namespace, peak: float) -> Measurement:
    import torch.multiprocessing as mp

    from medvl.plan import plan_spec

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(run_rank, args=(gpus, free_port(), config_name, args, results), nprocs=gpus, join=True,
                       start_method="spawn")
    ranks = [RankResult(**results.get()[1]) for _ in range(gpus)]
    spec = job_spec(config_name, args.batch_size, args.gradient_checkpointing, gpus)
    plan = plan_spec(spec)
    samples_per_s = gpus * args.batch_size * args.steps / max(r.seconds for r in ranks)
    strategy = "zero3" if spec.train.strategy == "deepspeed" else "ddp"
    return Measurement(
        config=config_name, gpus=gpus, batch_per_gpu=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, steps=args.steps, samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * plan.lm_tokens_per_sample,
        peak_allocated_gib=max(r.peak_allocated_gib for r in ranks),
        peak_reserved_gib=max(r.peak_reserved_gib for r in ranks),
        train_flops_per_sample=plan.train_flops_per_sample,
        mfu=samples_per_s * plan.train_flops_per_sample / (gpus * peak * 1e12),
        planned_gib=plan.memory_gib[strategy].total,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["lora", "full_zero3"])
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU counts to measure (default: 1 and all)")
    parser.add_argument("--batch-size", type=int, default=8, help="per GPU (the spec's train.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (needed for unknown cards)")
    parser.add_argument("--json-out", type=Path, help="also write the measurements here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was "
              "measured. Run it on a GPU node: python benchmarks/gpu_throughput.py "
              f"(exit code {NO_CUDA_EXIT} means exactly this).", file=sys.stderr)
        return NO_CUDA_EXIT
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        print(f"gpu_throughput: no bf16 peak known for {name!r}; pass --peak-tflops (dense bf16 TFLOP/s)",
              file=sys.stderr)
        return UNKNOWN_CARD_EXIT
    available = torch.cuda.device_count()
    counts = list(dict.fromkeys(args.gpus or [1, available]))
    if max(counts) > available:
        print(f"gpu_throughput: --gpus asks for {max(counts)} GPUs, this node has {available}", file=sys.stderr)
        return UNKNOWN_CARD_EXIT
    print(f"{available} × {name}, dense bf16 peak {peak:g} TFLOP/s each; batch {args.batch_size} per GPU, "
          f"{args.warmup} warm-up + {args.steps} timed steps, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'config':<11} {'GPUs':>4} {'samples/s':>10} {'tokens/s':>10} {'peak alloc':>10} {'reserved':>9} "
          f"{'planned':>8} {'MFU':>6}")
    measurements = []
    for config_name in args.configs:
        for gpus in counts:
            m = measure(config_name, gpus, args, peak)
            measurements.append(m)
            print(f"{m.config:<11} {m.gpus:>4} {m.samples_per_s:10.1f} {m.tokens_per_s:10.0f} "
                  f"{m.peak_allocated_gib:8.1f} G {m.peak_reserved_gib:7.1f} G {m.planned_gib:6.1f} G "
                  f"{100 * m.mfu:5.1f}%", flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"device": name, "peak_tflops": peak,
                                             "measurements": [asdict(m) for m in measurements]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
