"""A by-hand run of the Ray Serve PD app against one plain engine, with figures as JSON.

Owns: starting the app (``app.py``) with N prefill and M decode replicas on a local Ray
cluster and one plain vLLM engine, sending the same bounded set of greedy completions to
both (a few at a time through Ray's ingress), and writing what it saw: start-up time,
latencies, identical-token count, where each decoder's KV came from and how many engine
processes of each stage served requests (read from the connector's log lines).

    python examples/ray_serve_pd/smoke.py --prefill-replicas 2 --decode-replicas 2 \\
        --requests 24 --json benchmarks/results/ray_serve_pd.json

Exits 1 when any text differs or a decoder computed more than the last partial chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app import LocalRay, PDAppSpec, split_cores  # type: ignore[import-not-found]

from lmcache_pd.integration.vllm.launch import VLLMServer, free_port
from lmcache_pd.integration.vllm.tiny_model import make_tiny_model

MAX_REQUESTS = 200
LOAD_RE = re.compile(
    r"\[lmcache-pd pid=(\d+)\][^\n]*request (\S+): prompt (\d+) tokens, loading (\d+) tokens "
    r"\[\d+, \d+\) from (\w+), computing (\d+)"
)
PUSH_RE = re.compile(r"\[lmcache-pd pid=(\d+)\][^\n]*request \S+: pushed (\d+) chunk")


def post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> tuple[dict[str, Any], float]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        out = json.loads(resp.read())
    return out, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill-replicas", type=int, default=1)
    parser.add_argument("--decode-replicas", type=int, default=1)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests: expected 1..{MAX_REQUESTS}, got {args.requests}")
    if args.concurrency < 1:
        parser.error(f"--concurrency: expected >= 1, got {args.concurrency}")

    work = Path(tempfile.mkdtemp(prefix="lmcpd-ray-"))
    model = make_tiny_model(work / "tiny")
    rng = random.Random(51)
    prompts = [
        [rng.randrange(3, 500) for _ in range(rng.randrange(args.chunk_size, 450))]
        for _ in range(args.requests)
    ]
    prefill_cores, decode_cores = split_cores(os.cpu_count() or 1)
    spec = PDAppSpec(
        model=model,
        prefill_replicas=args.prefill_replicas,
        decode_replicas=args.decode_replicas,
        chunk_size=args.chunk_size,
        pd_buffer_size=8 << 20,
        decode_cpu_tier_gb=0.05,
        engine_cpus=0.3,
        prefill_cores=prefill_cores,
        decode_cores=decode_cores,
    )
    plain = VLLMServer(model, work / "plain.log", name="plain").start()
    cluster = LocalRay(num_cpus=2, http_port=free_port(), temp_dir=work / "ray")
    try:
        t0 = time.monotonic()
        cluster.start()
        url = cluster.deploy(spec)
        started_s = time.monotonic() - t0
        plain.wait_ready()

        def body(prompt: list[int]) -> dict[str, Any]:
            return {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }

        want = [post(f"{plain.url}/v1/completions", body(p))[0] for p in prompts]
        t1 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            got = list(pool.map(lambda p: post(f"{url}/completions", body(p)), prompts))
        wall_s = time.monotonic() - t1
        time.sleep(2.0)  # let the log files catch up
        logs = "\n".join(p.read_text(errors="replace") for p in cluster.session_logs())
    finally:
        cluster.stop()
        plain.stop()

    identical = sum(
        w["choices"][0]["text"] == g["choices"][0]["text"]
        for w, (g, _) in zip(want, got, strict=True)
    )
    loads = {m.group(2): m for m in LOAD_RE.finditer(logs)}
    per_request = []
    for prompt, (resp, _) in zip(prompts, got, strict=True):
        match = next((m for rid, m in loads.items() if rid.startswith(resp["id"])), None)
        per_request.append(
            {
                "prompt_tokens": len(prompt),
                "source": match.group(5) if match else None,
                "loaded": int(match.group(4)) if match else 0,
                "computed": int(match.group(6)) if match else None,
                "decode_pid": int(match.group(1)) if match else None,
            }
        )
    only_tail = all(
        r["computed"] is not None and r["computed"] <= max(r["prompt_tokens"] % args.chunk_size, 1)
        for r in per_request
    )
    latencies = [lat for _, lat in got]
    pushers = {int(m.group(1)) for m in PUSH_RE.finditer(logs)}
    result = {
        "what": "Ray Serve LLM PD app (build_pd_openai_app) + LMCachePDConnector, vLLM CPU",
        "ray": __import__("ray").__version__,
        "prefill_replicas": args.prefill_replicas,
        "decode_replicas": args.decode_replicas,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "chunk_size": args.chunk_size,
        "max_tokens": args.max_tokens,
        "app_start_s": round(started_s, 1),
        "wall_s": round(wall_s, 2),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p90_s": round(percentile(latencies, 0.9), 3),
        "identical_to_one_engine": f"{identical}/{args.requests}",
        "kv_from_fetch": sum(r["source"] == "fetch" for r in per_request),
        "decoder_computed_only_last_partial_chunk": only_tail,
        "decode_engines_used": len({r["decode_pid"] for r in per_request if r["decode_pid"]}),
        "prefill_engines_used": len(pushers),
        "host": f"{os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == args.requests and only_tail else 1


if __name__ == "__main__":
    sys.exit(main())
