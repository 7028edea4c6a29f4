"""Does dynamic batching pay? Throughput and latency of the served tiny BLIP with and without it, in one run.

    python benchmarks/serve_load.py [--requests 160] [--concurrency 16] [--batch 16] [--batch-wait 0.1]
                                    [--max-new-tokens 24]

One local Ray (2 CPUs), one Serve proxy on 127.0.0.1, one replica (1 CPU, one torch thread) of the quickstart's
tiny BLIP (random weights, 128 px, greedy decoding of ``--max-new-tokens`` tokens: an untrained model rarely
emits its end token, so requests cost about the same). The same application is deployed twice, ``max_batch_size`` 1
and ``--batch``, and each gets the same bounded load: ``--concurrency`` clients, each sending its next request
when the last one is answered, ``--requests`` in all, synthetic radiographs as base64 JSON. After a warm-up,
it prints requests/s and client-side p50/p99 latency for both, the mean batch the replica ran, and the ratio.
``--batch-wait`` is how long a batch may wait to fill: at 0.02 s the 2-CPU machine's client and proxy did not
deliver requests fast enough to fill batches (mean ~6 of 16); 0.1 s fills them.
A measurement, not a test: on a shared machine, look at the load average it prints.

    python benchmarks/serve_load.py --adapters 4 [--requests 160] [--concurrency 16] [--batch 16] ...

Many LoRA adapters on one base (``serve.adapters``): a tiny BLIP-2 base and ``--adapters`` tiny LoRA adapters
(random B matrices, as tests/test_serve_adapters.py builds them), one replica with
``max_adapters_per_replica`` = ``--adapters`` (all stay loaded, so this measures switching and split batches,
not loading). The same load runs twice: every request names the first adapter, then requests name the
adapters in turn. It prints requests/s of both and, on the last line, ``ratio X`` (many / one).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def spec_for(model_dir: str, batch: int, max_new_tokens: int, concurrency: int, wait_s: float):
    from medvl.spec import parse_spec

    return parse_spec({
        "name": f"serve-load-batch{batch}", "output_dir": tempfile.gettempdir(), "stages": ["serve"],
        "data": {"image_size": 128, "max_text_length": 48},
        "model": {"recipe": "blip_caption", "preset": "", "name_or_path": model_dir},
        "serve": {"checkpoint": model_dir, "num_cpus": 1, "max_batch_size": batch, "batch_wait_timeout_s": wait_s,
                  "max_ongoing_requests": max(concurrency, batch), "num_beams": 1, "max_new_tokens": max_new_tokens},
    })


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], list[int]]:
    """Wall seconds, per-request latencies (s) and the batch size each ran in; every answer must be 200."""
    import aiohttp

    latencies: list[float] = []
    batches: list[int] = []
    queue = list(reversed(bodies))

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {answer}")
            latencies.append(time.perf_counter() - started)
            batches.append(answer["batch_size"])

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, batches


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def adapters_spec(base: str, folders: list[str], args: argparse.Namespace):
    from medvl.spec import parse_spec

    return parse_spec({
        "name": "serve-load-adapters", "output_dir": tempfile.gettempdir(), "stages": ["serve"],
        "data": {"image_size": 32, "max_text_length": 16},
        "model": {"recipe": "blip2", "preset": "", "name_or_path": base},
        "train": {"finetune": "lora"},
        "eval": {"clinical": False},
        "serve": {"checkpoint": folders[0], "adapters": folders, "max_adapters_per_replica": len(folders),
                  "num_cpus": 1, "max_batch_size": args.batch, "batch_wait_timeout_s": args.batch_wait,
                  "max_ongoing_requests": max(args.concurrency, args.batch), "num_beams": 1,
                  "max_new_tokens": args.max_new_tokens},
    })


def build_adapters(count: int, texts: list[str], work: Path) -> tuple[str, list[str]]:
    """A tiny BLIP-2 base and ``count`` LoRA adapters of it that differ (peft starts B at zero)."""
    import torch

    from medvl.models.blip2 import save_tiny_blip2
    from medvl.models.registry import build_recipe

    base = save_tiny_blip2(work / "blip2", texts, 32)
    recipe = None
    folders = []
    for i in range(count):
        folder = work / f"adapter{i}"
        if recipe is None:
            recipe = build_recipe(adapters_spec(base, [str(folder)], argparse.Namespace(
                batch=1, batch_wait=0.01, concurrency=1, max_new_tokens=1)))
        model = recipe.load_for_training(base)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 2.0)
        recipe.save(model, base, folder)
        folders.append(str(folder))
    return base, folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapters_main(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from medvl.data.synthetic import synthetic_records
    from medvl.serve.adapters import resolve_adapters
    from medvl.serve.command import application

    records = list(synthetic_records(64, image_size=64))
    base, folders = build_adapters(args.adapters, [r.text for r in records],
                                   Path(tempfile.mkdtemp(prefix="serve-load-adapters-")))
    spec = adapters_spec(base, folders, args)
    adapters = resolve_adapters(spec)
    names = [a["name"] for a in adapters]
    images = [base64.b64encode(r.image).decode() for r in records]
    port = free_port()
    ray.init(num_cpus=2, log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(spec, folders[0], "", adapters), name="load", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/report"
        every = [{"image": images[i % len(images)], "model": names[i % len(names)]} for i in range(args.requests)]
        asyncio.run(load(url, every[: max(args.warmup, len(names))], args.concurrency))  # every adapter loaded
        for label, used in (("1 adapter", 1), (f"{len(names)} adapters", len(names))):
            workload = [{"image": images[i % len(images)], "model": names[i % used]} for i in range(args.requests)]
            load_before = os.getloadavg()[0]
            wall, latencies, batches = asyncio.run(load(url, workload, args.concurrency))
            results[label] = (args.requests / wall, percentile(latencies, 50), percentile(latencies, 99),
                              statistics.mean(batches), load_before)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{args.requests} requests, {args.concurrency} concurrent clients, tiny BLIP-2 32 px + LoRA adapters, "
          f"greedy, {args.max_new_tokens} new tokens, 1 replica (1 CPU), max_batch_size {args.batch}, "
          f"on {os.cpu_count()} CPUs")
    print(f"{'adapters used':>15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'load avg':>9}")
    for label, (rate, p50, p99, mean_batch, load_avg) in results.items():
        print(f"{label:>15} {rate:>8.1f} {1000 * p50:>8.0f} {1000 * p99:>8.0f} {mean_batch:>11.1f} {load_avg:>9.2f}")
    many, one = results[f"{len(names)} adapters"][0], results["1 adapter"][0]
    print(f"ratio {many / one:.2f} (requests/s with {len(names)} adapters / with 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--batch-wait", type=float, default=0.1, help="batch_wait_timeout_s of the batched run")
    parser.add_argument("--adapters", type=int, default=0,
                        help="compare N LoRA adapters multiplexed on one base with one adapter (see above)")
    args = parser.parse_args()
    if args.adapters:
        adapters_main(args)
        return

    import ray
    from ray import serve
    from transformers import BlipForConditionalGeneration

    from medvl.data.synthetic import synthetic_records
    from medvl.models.blip_caption import save_tiny_blip
    from medvl.serve.command import application

    records = list(synthetic_records(64, image_size=128))
    model_dir = save_tiny_blip(BlipForConditionalGeneration, Path(tempfile.mkdtemp(prefix="serve-load-")),
                               [r.text for r in records], 128)
    bodies = [{"image": base64.b64encode(r.image).decode()} for r in records]
    workload = [bodies[i % len(bodies)] for i in range(args.requests)]

    port = free_port()
    ray.init(num_cpus=2, log_to_driver=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batch in (1, args.batch):
            spec = spec_for(model_dir, batch, args.max_new_tokens, args.concurrency, args.batch_wait)
            serve.run(application(spec, model_dir, ""), name="load", route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1/caption"
            asyncio.run(load(url, bodies[: args.warmup], args.concurrency))
            load_before = os.getloadavg()[0]
            wall, latencies, batches = asyncio.run(load(url, workload, args.concurrency))
            results[batch] = (args.requests / wall, percentile(latencies, 50), percentile(latencies, 99),
                              statistics.mean(batches), load_before)
            serve.delete("load")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{args.requests} requests, {args.concurrency} concurrent clients, tiny BLIP 128 px, greedy, "
          f"{args.max_new_tokens} new tokens, 1 replica (1 CPU) on {os.cpu_count()} CPUs")
    print(f"{'max_batch_size':>15} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'load avg':>9}")
    for batch, (rate, p50, p99, mean_batch, load_avg) in results.items():
        print(f"{batch:>15} {rate:>8.1f} {1000 * p50:>8.0f} {1000 * p99:>8.0f} {mean_batch:>11.1f} {load_avg:>9.2f}")
    print(f"throughput ratio (batch {args.batch} / batch 1): {results[args.batch][0] / results[1][0]:.2f}x")


if __name__ == "__main__":
    main()
