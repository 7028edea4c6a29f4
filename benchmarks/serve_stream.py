"""Does streaming give the first text early? Time to the first content chunk of a streamed chat completion versus
the whole answer, on the served tiny BLIP.

    python benchmarks/serve_stream.py [--requests 20] [--max-new-tokens 48]

One local Ray (2 CPUs), one replica (1 CPU) of the quickstart's tiny BLIP (random weights, 128 px, greedy: an
untrained model rarely emits its end token, so every answer runs to ``--max-new-tokens``). One client sends
``--requests`` chat completions one after another, each twice: streamed (``"stream": true``) and not. It prints
the median time to the first content chunk, the median time to the last, the median non-streamed latency, and on
the last line ``first / whole X``: the first chunk's share of the whole answer's time (near 1 when the stream
only starts after generation, near 1 / tokens when it starts after the first token). A measurement, not a test:
on a shared machine, look at the load average it prints.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from serve_load import free_port, spec_for

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def streamed(url: str, body: dict) -> tuple[float, float, int]:
    """Seconds to the first content chunk and to the end of the stream, and how many content chunks came."""
    import requests

    started, first, chunks = time.perf_counter(), None, 0
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[len(b"data: "):])["choices"][0]["delta"]
            if delta.get("content"):
                chunks += 1
                first = first if first is not None else time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started, chunks


def whole(url: str, body: dict) -> float:
    import requests

    started = time.perf_counter()
    requests.post(url, json=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import ray
    from ray import serve
    from transformers import BlipForConditionalGeneration

    from medvl.data.synthetic import synthetic_records
    from medvl.models.blip_caption import save_tiny_blip
    from medvl.serve.command import application

    records = list(synthetic_records(16, image_size=128))
    model_dir = save_tiny_blip(BlipForConditionalGeneration, Path(tempfile.mkdtemp(prefix="serve-stream-")),
                               [r.text for r in records], 128)
    bodies = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(r.image).decode()}}]}]} for r in records]
    port = free_port()
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = spec_for(model_dir, 1, args.max_new_tokens, 4, 0.0)
        serve.run(application(spec, model_dir, ""), name="stream", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        streamed(url, bodies[0]), whole(url, bodies[0])  # warm-up
        load_before = os.getloadavg()[0]
        runs = [(streamed(url, bodies[i % len(bodies)]), whole(url, bodies[i % len(bodies)]))
                for i in range(args.requests)]
    finally:
        serve.shutdown()
        ray.shutdown()

    first = statistics.median(s[0] for s, _ in runs)
    last = statistics.median(s[1] for s, _ in runs)
    plain = statistics.median(w for _, w in runs)
    chunks = statistics.median(s[2] for s, _ in runs)
    print(f"{args.requests} requests one at a time, tiny BLIP 128 px, greedy, {args.max_new_tokens} new tokens, "
          f"1 replica (1 CPU) on {os.cpu_count()} CPUs, load average {load_before:.2f}")
    print(f"streamed: first chunk {1000 * first:.0f} ms, last {1000 * last:.0f} ms ({chunks:.0f} chunks); "
          f"not streamed: {1000 * plain:.0f} ms")
    print(f"first / whole {first / last:.2f}")


if __name__ == "__main__":
    main()
