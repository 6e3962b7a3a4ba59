"""mmstory serve under load: requests/s and latency percentiles with dynamic batching on and off.

For each setting (batch-size-1 serving: ``--max-batch 1``; dynamic batching: ``--max-batch 32``) this starts
``mmstory serve MODEL`` as its own process on a free localhost port, warms it up, then drives it with
``/v1/caption`` requests (greedy, 16 new tokens, the bundled val_style emoji images in turn):

  * heavy load: ``--clients`` concurrent clients (default 32), ``--requests`` requests in all;
  * moderate load: ``--moderate-clients`` (default 4) concurrent clients, for the latency spread (p99 / p50).

Each client sends its next request when its last one is answered (closed loop). The clients run in this
process on the same machine (asyncio + httpx), so they take some of its CPU from the server, the same for both
settings. Failed requests are counted, never dropped. The peer is batch-size-1 serving of the same model in
the same run; the result is the ratio. No timing is asserted by any test.

    python experiments/bench/serve.py --model runs/emoji_tiny/model          # ~3 min on 2 cores
    python experiments/bench/serve.py --model M --requests 64 --clients 8    # quicker
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARD = ROOT / "data_manifests" / "emoji" / "val_style-000000.tar"


def bundled_images(n: int) -> list[tuple[str, bytes]]:
    """The first ``n`` PNGs of the bundled val_style shard (real emoji images, as a user would upload)."""
    out = []
    with tarfile.open(SHARD) as tar:
        for member in tar:
            if member.name.endswith(".png"):
                out.append((Path(member.name).name, tar.extractfile(member).read()))
                if len(out) == n:
                    break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mmstory serve`` in its own process, stopped on exit."""

    def __init__(self, model: str, *, max_batch: int, max_wait_ms: float, max_queue: int, threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mmstory.cli", "serve", model, "--port", str(self.port), "--max-batch",
               str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue),
               "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmstory serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("mmstory serve did not answer /healthz within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def drive(url: str, images: list[tuple[str, bytes]], *, clients: int, requests: int,
                max_new_tokens: int) -> dict:
    """``requests`` caption requests from ``clients`` closed-loop clients; latencies in ms."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    batch_sizes: list[int] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient):
        for i in counter:
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/caption", files={"image": (name, data, "image/png")},
                                    data={"max_new_tokens": str(max_new_tokens)})
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    batch_sizes.append(r.json()["timings"]["batch_size"])
                else:
                    failures[str(r.status_code)] = failures.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as e:
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"clients": clients, "requests": requests, "ok": len(latencies), "failures": failures,
            "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None}


def run_setting(model: str, images, *, max_batch: int, max_wait_ms: float, clients: int, requests: int,
                moderate_clients: int, moderate_requests: int, max_new_tokens: int, threads: int | None) -> dict:
    with Server(model, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max(256, 4 * clients),
                threads=threads) as server:
        asyncio.run(drive(server.url, images, clients=clients, requests=2 * clients, max_new_tokens=max_new_tokens))
        heavy = asyncio.run(drive(server.url, images, clients=clients, requests=requests,
                                  max_new_tokens=max_new_tokens))
        moderate = asyncio.run(drive(server.url, images, clients=moderate_clients, requests=moderate_requests,
                                     max_new_tokens=max_new_tokens))
        stats = httpx.get(server.url + "/v1/stats").json()
    return {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "heavy": heavy, "moderate": moderate,
            "server_stats": stats}


def machine() -> dict:
    import torch

    cpu = platform.processor()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "python": platform.python_version()}


def run(model: str, *, clients: int = 32, requests: int = 640, moderate_clients: int = 4,
        moderate_requests: int = 160, max_wait_ms: float = 5.0, batched_max: int = 32, max_new_tokens: int = 16,
        threads: int | None = None, n_images: int = 64) -> dict:
    images = bundled_images(n_images)
    common = dict(clients=clients, requests=requests, moderate_clients=moderate_clients,
                  moderate_requests=moderate_requests, max_new_tokens=max_new_tokens, threads=threads)
    batch1 = run_setting(model, images, max_batch=1, max_wait_ms=0, **common)
    batched = run_setting(model, images, max_batch=batched_max, max_wait_ms=max_wait_ms, **common)
    return {"model": model, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "request": f"POST /v1/caption, greedy, {max_new_tokens} new tokens at most, {len(images)} bundled "
                       f"val_style PNGs in turn",
            "batch1": batch1, "batched": batched,
            "speedup_requests_per_s": round(batched["heavy"]["requests_per_s"] / batch1["heavy"]["requests_per_s"], 2),
            "batched_moderate_p99_over_p50": round(batched["moderate"]["p99_ms"] / batched["moderate"]["p50_ms"], 2)}


def table(res: dict) -> str:
    rows = ["| setting | load | clients | requests ok / failed | requests/s | p50 ms | p95 ms | p99 ms | mean batch |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in ("batch1", "batched"):
        s = res[name]
        for load in ("heavy", "moderate"):
            r = s[load]
            rows.append(f"| max_batch {s['max_batch']} | {load} | {r['clients']} | {r['ok']} / "
                        f"{sum(r['failures'].values())} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                        f"{r['p99_ms']} | {r['mean_batch_size']} |")
    rows.append(f"\nbatched / batch-1 requests/s at {res['batched']['heavy']['clients']} clients: "
                f"{res['speedup_requests_per_s']}x; batched p99 / p50 at moderate load: "
                f"{res['batched_moderate_p99_over_p50']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/emoji_tiny/model")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--moderate-clients", type=int, default=4)
    p.add_argument("--moderate-requests", type=int, default=160)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=32, help="the batched setting's max batch")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, help="the server's torch threads")
    p.add_argument("--out", default=str(ROOT / "experiments" / "bench" / "serve_results.json"))
    a = p.parse_args(argv)
    if not Path(a.model).is_dir():
        p.error(f"model folder not found: {a.model} (train one first: make main)")
    res = run(a.model, clients=a.clients, requests=a.requests, moderate_clients=a.moderate_clients,
              moderate_requests=a.moderate_requests, max_wait_ms=a.max_wait_ms, batched_max=a.max_batch,
              max_new_tokens=a.max_new_tokens, threads=a.threads)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
