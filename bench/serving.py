"""/v1/classify on CPU with the tiny model: latency p50/p99 and throughput at concurrency 1, 8 and
32 for the vLLM backend and the transformers backend (the base model, 16-token answers, with an
adapter promoted), and the swap time (promote call → first answer from the new adapter). Each
backend runs as a real `python -m serving` process.

    python bench/serving.py [--requests 96] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.tiny_model import build_tiny_model
from storage.artifacts import ArtifactStore
from storage.db import make_engine
from storage.migrate import upgrade
from tests.serving.conftest import TOKEN, Deployment, adapter_checkpoints, start, stop

HEADLINES = [
    line.split("\t")[0]
    for line in (Path(__file__).resolve().parents[1] / "runner" / "assets" / "tokenizer_corpus.txt")
    .read_text(encoding="utf-8")
    .splitlines()
    if line and "\n" not in line and len(line) < 40
][:500]


def setup(root: Path) -> tuple[dict[str, str], dict[str, int]]:
    model_dir = build_tiny_model(root / "tiny")
    url = f"sqlite:///{root / 'bench.db'}"
    upgrade(url)
    store = ArtifactStore(root / "artifacts")
    meta = {
        "protocol_version": 1,
        "base_model": str(model_dir),
        "adapter": True,
        "labels": ["体育", "财经"],
        "prompt_frame": {"prefix": "标题："},
    }
    engine = make_engine(url)
    ids = adapter_checkpoints(
        engine, store, model_dir, {"A": ("体育", 8, meta), "B": ("财经", 8, meta)}
    )
    engine.dispose()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ARTIFACT_DIR": str(root / "artifacts"),
        "BASE_MODEL": str(model_dir),
        "SERVING_API_KEY": TOKEN,
        "SERVING_MAX_NEW_TOKENS": "16",
    }
    return env, ids


def measure(deployment: Deployment, concurrency: int, requests: int) -> dict:
    latencies: list[float] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        # The base model (random weights) never ends early: every answer is exactly
        # SERVING_MAX_NEW_TOKENS tokens, so each row does the same work. (An adapter may stop
        # after its label or run to the limit, which would decide the numbers by itself.)
        response = client.post(
            "/v1/classify", json={"text": HEADLINES[i % len(HEADLINES)], "model": "base"}
        )
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)

    with deployment.client() as client, ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm up
        latencies.clear()
        started = time.perf_counter()
        list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "throughput": requests / wall,
    }


def swap_time(deployment: Deployment, target: int) -> float:
    with deployment.client() as client:
        started = time.perf_counter()
        client.post(
            "/v1/adapters/promote", json={"checkpoint_id": target, "by": "bench"}
        ).raise_for_status()
        while True:
            answer = client.post("/v1/classify", json={"text": "球队夺冠"}).json()
            if answer["model"]["checkpoint_id"] == target:
                return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    env, ids = setup(root)
    rows = []
    for backend in ("vllm", "transformers"):
        deployment = Deployment(root, {**env, "SERVING_BACKEND": backend}, ids)
        start(deployment)
        try:
            with deployment.client() as client:
                current = client.get("/healthz").json()["current"]["checkpoint_id"]
                if current != ids["A"]:
                    client.post(
                        "/v1/adapters/promote", json={"checkpoint_id": ids["A"], "by": "bench"}
                    ).raise_for_status()
            for concurrency in (1, 8, 32):
                rows.append({"backend": backend, **measure(deployment, concurrency, args.requests)})
                print(rows[-1], flush=True)
            target = ids["B"] if current != ids["B"] else ids["A"]
            swaps = [
                swap_time(deployment, target),
                swap_time(deployment, ids["A"] if target == ids["B"] else ids["B"]),
            ]
            rows.append({"backend": backend, "swap_s": max(swaps)})
            print(rows[-1], flush=True)
        finally:
            stop(deployment)
    text = table(rows)
    print(text)
    (args.out / "serving.md").write_text(text + "\n")


def table(rows: list[dict]) -> str:
    lines = [
        "| backend | concurrency | requests | p50 ms | p99 ms | requests/s | vs transformers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {
        r["concurrency"]: r["throughput"]
        for r in rows
        if r["backend"] == "transformers" and "concurrency" in r
    }
    for r in rows:
        if "concurrency" in r:
            ratio = r["throughput"] / base[r["concurrency"]] if base else float("nan")
            lines.append(
                f"| {r['backend']} | {r['concurrency']} | {r['requests']} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['throughput']:.1f} | "
                f"{ratio:.1f}× |"
            )
    lines.append("")
    lines.append(
        "| backend | swap: promote call → first answer from the new adapter (worst of 2) |"
    )
    lines.append("| --- | --- |")
    for r in rows:
        if "swap_s" in r:
            lines.append(f"| {r['backend']} | {r['swap_s'] * 1000:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
