"""A registered engine served by MLflow's scoring server against the same MLflow Model in process.

The benchmark's medium model (60M parameters) as an og fp32 engine, written as ftd registers it
(`tasks.serving.package.write_chat_model`). Per-request latency at batch 1, 32 new tokens: the
model loaded in process (`mlflow.pyfunc.load_model(...).predict`) against the same folder served
by `mlflow models serve` (HTTP on 127.0.0.1), requests alternating between the two; then
requests/s with 4 concurrent clients against the server, and against the in-process model
called from 4 threads. `python -m bench.serving` (~2 min)."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import synth
from bench.stats import fmt, stats

MEDIUM = {"hidden": 512, "intermediate": 1536, "layers": 8, "vocab": 32000, "heads": 8}
REQUEST = {"messages": [{"role": "user", "content": "Count the digits of 123456"}], "max_tokens": 32}
TARGET = 1.2  # served time per request / in-process


def main() -> int:
    import mlflow

    from bench.run import RESULTS, build_engine, set_threads
    from ftd.config import TargetConfig
    from ftd.servers import start_model_server, stop_servers, wait_healthy
    from tasks.serving.package import ServedAdapter, write_chat_model
    from tasks.serving.served import ask, free_port

    work = Path(tempfile.mkdtemp(prefix="ftd-bench-serving-"))
    try:
        config = synth.llama_config(**MEDIUM)
        base = work / "base"
        info = synth.write_decode_model(base, config)
        engine = work / "engine"
        build_engine(base, engine, "fp32", work)
        set_threads(engine / "genai_config.json", 1)
        target = TargetConfig(name="bench", precision="fp32")
        model_dir = work / "model"
        write_chat_model(model_dir, engine, target, [ServedAdapter("bench", base, [])], base, "bench",
                         ("onnxruntime-genai", "onnxruntime"))  # fmt: skip
        local = mlflow.pyfunc.load_model(str(model_dir))
        server = start_model_server(str(model_dir), f"sqlite:///{work / 'mlflow.db'}", free_port(), work / "logs")
        try:
            wait_healthy([server], timeout=300)
            url = server.ui_url
            for _ in range(3):  # warm-up both
                local.predict(REQUEST)
                ask(url, REQUEST)
            times: dict[str, list[float]] = {"in_process": [], "served": []}
            tokens = {}
            for i in range(20):
                for who in ("in_process", "served") if i % 2 == 0 else ("served", "in_process"):
                    started = time.perf_counter()
                    answer = local.predict(REQUEST) if who == "in_process" else ask(url, REQUEST)
                    times[who].append(time.perf_counter() - started)
                    tokens[who] = answer["custom_outputs"]["tokens"]
            ratios = [s / p for s, p in zip(times["served"], times["in_process"])]

            def throughput(call, clients: int = 4, per_client: int = 6) -> float:
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(lambda _: [call() for _ in range(per_client)], range(clients)))
                return clients * per_client / (time.perf_counter() - started)

            rps = {
                "served": throughput(lambda: ask(url, REQUEST)),
                "in_process": throughput(lambda: local.predict(REQUEST)),
            }
        finally:
            stop_servers([server])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": {**MEDIUM, "parameters": info["parameters"], "engine": "og fp32, 1 thread", "new_tokens": 32},
        "latency_s": {k: stats(v) for k, v in times.items()},
        "served_over_in_process": stats(ratios),
        "requests_per_s_4_clients": rps,
        "same_tokens": tokens["served"] == tokens["in_process"],
        "target": f"served <= {TARGET}x in-process time per request",
        "met": statistics.median(ratios) <= TARGET,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"### Served vs in process ({info['parameters'] / 1e6:.0f}M-parameter Llama, og fp32, 1 thread, batch 1, "
        "32 new tokens; 20 requests each, alternating)", "",
        "| benchmark | served (HTTP) | in process | ratio | target | met |", "|---|---|---|---|---|---|",
        f"| time per request (ms) | {fmt({k: v * 1000 if k != 'runs' else v for k, v in result['latency_s']['served'].items()})} | "
        f"{fmt({k: v * 1000 if k != 'runs' else v for k, v in result['latency_s']['in_process'].items()})} | "
        f"{fmt(result['served_over_in_process'], 3)} | ≤ {TARGET} | {'yes' if result['met'] else '**no**'} |",
        f"| requests/s, 4 concurrent clients | {rps['served']:.1f} | {rps['in_process']:.1f} | "
        f"{rps['served'] / rps['in_process']:.3f} | report | — |",
        "", f"Served and in-process answers identical: {'yes' if result['same_tokens'] else '**no**'}.",
    ]  # fmt: skip
    (RESULTS / "serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
