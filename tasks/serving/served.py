"""The gate through the server (`smoke.served: true`): a version's MLflow Model, written but not
yet registered, is started with MLflow's own scoring server (`mlflow models serve`, 127.0.0.1,
its own process group), asked every gate prompt over HTTP — each adapter of a bundle — and must
answer with exactly the tokens the engine gave the gate. A mismatch or a failed request fails
the run like a missed threshold: registration is all or nothing, so nothing of it is registered."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import GateFailed


@dataclass(frozen=True)
class ServedCase:
    adapter: str
    messages: list[dict]
    tokens: list[int]  # what the engine (or the adapter, for an adapter version) answered in the gate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def check_served(model_dir: Path, cases: list[ServedCase], max_tokens: int, bundle: bool, tracking_uri: str,
                 log_dir: Path) -> dict:  # fmt: skip
    """Serve `model_dir`, send every case, compare; the tags to record on the version."""
    from ftd.servers import start_model_server, stop_servers, wait_healthy

    started = time.perf_counter()
    server = start_model_server(str(model_dir), tracking_uri, free_port(), log_dir)
    failures = []
    try:
        wait_healthy([server], timeout=300)
        for i, case in enumerate(cases):
            body = {"messages": case.messages, "max_tokens": max_tokens,
                    **({"custom_inputs": {"adapter": case.adapter}} if bundle else {})}  # fmt: skip
            try:
                tokens = ask(server.ui_url, body)["custom_outputs"]["tokens"]
            except (urllib.error.URLError, KeyError, ValueError) as exc:
                failures.append(f"prompt {i} ({case.adapter}): request failed: {exc}")
                continue
            if tokens != case.tokens:
                failures.append(
                    f"prompt {i} ({case.adapter}): served {tokens[:8]}, the gate's engine {case.tokens[:8]}"
                )
    finally:
        stop_servers([server])
    seconds = round(time.perf_counter() - started, 1)
    if failures:
        raise GateFailed(f"served gate: {len(failures)} of {len(cases)} answers differ: " + "; ".join(failures[:4]))
    return {"ftd.served": f"passed: {len(cases)} prompts over HTTP, equal to the gate's engine ({seconds} s)"}
