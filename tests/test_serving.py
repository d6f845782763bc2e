"""What was registered is served and answers like the gated engine: `mlflow.pyfunc.load_model`,
`ftd chat`, and MLflow's own scoring server (`ftd deploy`) on a multi-LoRA bundle, bad requests
included. One cold run of the default experiment with a second adapter and a multi-LoRA target."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.backends.llama_cpp import tools
from tests.conftest import ROOT, run_ftd, seed_store

pytestmark = pytest.mark.e2e
# an adapter trained elsewhere (rsLoRA, r=16): imported, not trained, so the run stays short
SECOND_ADAPTER = ("adapters.1={name: imported, import_from: data/adapters/numbers-rslora-r16, "
                  "data: {train: data/numbers/train.jsonl, eval: data/numbers/eval.jsonl}}")  # fmt: skip
BUNDLE = "targets.1={name: onnx-multi-lora, mode: multi_lora, precision: fp32}"
GGUF = "targets.2={name: gguf-multi-lora, backend: llama_cpp, mode: multi_lora, precision: f32}"
# Without llama.cpp on the machine (no compiler at make install) the gguf target is skipped with the
# reason (tests/test_llama_cpp.py): the other versions are checked all the same.
BUNDLES = ("onnx-multi-lora", "gguf-multi-lora") if tools.unavailable_reason() is None else ("onnx-multi-lora",)


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained_default) -> dict:
    artifacts = seed_store(trained_default, tmp_path_factory.mktemp("serving") / "artifacts")
    result = run_ftd(artifacts, "--set", SECOND_ADAPTER, "--set", BUNDLE, "--set", GGUF, "--set", "smoke.max_prompts=16",
                     "--set", "smoke.served=true")  # fmt: skip
    assert result.code == 0, result.stderr[-3000:]
    return {"artifacts": artifacts, "summary": result.summary}


def reference(run: dict, adapter: str) -> tuple[list[dict], list[list[int]]]:
    """The eval prompts of `adapter` and the merged model's greedy tokens (= the engine's: the gate
    measured agreement 1.0 on them)."""
    stages = {(s["stage"], s["label"]): s["key"] for s in run["summary"]["stages"]}
    ref = run["artifacts"] / "store" / "reference" / stages[("reference", adapter)]
    for target in ("onnx-fp32", *BUNDLES):
        assert run["summary"]["metrics"][f"{adapter}.{target}.agreement.merged_vs_engine"] == 1.0
    prompts = json.loads((ref / "prompts.json").read_text())["prompts"]
    return prompts, json.loads((ref / "tokens.json").read_text())["merged"]


def versions(run: dict) -> dict[str, str]:
    return {r["item"]: f"models:/{r['name']}/{r['version']}" for r in run["summary"]["registered"]}


def test_every_registered_engine_loads_and_answers_like_the_gate(run: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run['artifacts'] / 'mlflow.db'}")
    uris = versions(run)
    for item, adapter, custom in [("numbers/onnx-fp32", "numbers", None), ("imported/onnx-fp32", "imported", None),
                                  ("onnx-multi-lora", "numbers", {"adapter": "numbers"}),
                                  ("onnx-multi-lora", "imported", {"adapter": "imported"}),
                                  ("gguf-multi-lora", "numbers", {"adapter": "numbers"}),
                                  ("gguf-multi-lora", "imported", {"adapter": "imported"})]:  # fmt: skip
        if item.endswith("multi-lora") and item not in BUNDLES:
            continue
        model = mlflow.pyfunc.load_model(uris[item])
        prompts, expected = reference(run, adapter)
        for p, tokens in zip(prompts, expected):
            request = {"messages": p["messages"], "max_tokens": 8, **({"custom_inputs": custom} if custom else {})}
            assert model.predict(request)["custom_outputs"]["tokens"] == tokens, (item, adapter, p)
    version = mlflow.MlflowClient().get_model_version("tiny-llama-onnx-multi-lora", "1")
    assert version.tags["ftd.servable"] == "chat" and version.tags["ftd.adapters"] == "numbers,imported"


def test_the_gate_ran_through_the_scoring_server_before_each_version_was_registered(run: dict) -> None:
    """smoke.served: every version was served by `mlflow models serve` and asked each adapter's 16
    gate prompts over HTTP before it was registered; the report and the version's tag say so."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run['artifacts'] / 'mlflow.db'}")
    registered = run["summary"]["registered"]
    assert len(registered) == 4 + len(BUNDLES)  # 2 adapters, 2 merged engines, the bundles
    for r in registered:
        prompts = 32 if r["item"] in ("onnx-multi-lora", "gguf-multi-lora") else 16
        assert r["served"].startswith(f"passed: {prompts} prompts over HTTP"), r
        assert client.get_model_version(r["name"], r["version"]).tags["ftd.served"] == r["served"]


def test_the_served_gate_fails_on_an_answer_that_differs(run: dict) -> None:
    """The same check on a registered model with one expected answer changed: it fails, naming it."""
    import mlflow

    from ftd.errors import GateFailed
    from tasks.serving.served import ServedCase, check_served

    mlflow.set_tracking_uri(f"sqlite:///{run['artifacts'] / 'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts(versions(run)["numbers/onnx-fp32"]))
    prompts, expected = reference(run, "numbers")
    cases = [ServedCase("numbers", p["messages"], t) for p, t in zip(prompts[:2], expected[:2])]
    cases[1] = ServedCase("numbers", cases[1].messages, [*cases[1].tokens[:-1], cases[1].tokens[-1] + 1])
    with pytest.raises(GateFailed, match=r"served gate: 1 of 2 answers differ: prompt 1 \(numbers\)"):
        check_served(local, cases, 8, False, f"sqlite:///{run['artifacts'] / 'mlflow.db'}", run["artifacts"] / "logs")


def test_every_registered_adapter_is_a_model_over_its_verified_base(run: dict) -> None:
    """An adapter version stores only the adapter; loading it rebuilds the base and checks its
    files' digest, and its answers and logits are the adapter's reference outputs."""
    import mlflow
    import numpy as np

    from tasks.smoke import load_generations

    mlflow.set_tracking_uri(f"sqlite:///{run['artifacts'] / 'mlflow.db'}")
    uris = {r["item"]: f"models:/{r['name']}/{r['version']}" for r in run["summary"]["registered"]
            if r["kind"] == "adapter"}  # fmt: skip
    assert set(uris) == {"numbers", "imported"}
    stages = {(s["stage"], s["label"]): s["key"] for s in run["summary"]["stages"]}
    for adapter, uri in uris.items():
        model = mlflow.pyfunc.load_model(uri)
        ref = run["artifacts"] / "store" / "reference" / stages[("reference", adapter)]
        info = json.loads((ref / "prompts.json").read_text())
        expected = load_generations(ref)["adapter"]
        engine = model._model_impl.chat_model._engine(adapter)  # MLflow's ChatModel wrapper has no public accessor
        for i, (p, ids) in enumerate(list(zip(info["prompts"], info["ids"]))[:6]):
            answer = model.predict({"messages": p["messages"], "max_tokens": 8})
            assert answer["custom_outputs"]["tokens"] == expected[i].tokens, (adapter, p)
            logits = engine.greedy(ids, 8, info["eos"]).logits
            assert max(float(np.abs(a - b).max()) for a, b in zip(logits, expected[i].logits)) < 1e-4
        files = {p.name for p in Path(model._model_impl.chat_model.engine_dir).iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files  # the base is not stored


def ftd(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          input=input, timeout=300)  # fmt: skip


def test_ftd_chat_by_version_and_by_alias(run: dict, capsys) -> None:
    """Two real `ftd chat` processes (the exit-code contract); the rest through `app.cli.main`."""
    import mlflow

    from app.cli import main

    prompts, expected = reference(run, "numbers")
    question = prompts[0]["messages"][-1]["content"]
    args = ["--artifacts-dir", str(run["artifacts"]), "--prompt", question, "--max-tokens", "8"]
    by_version = ftd("chat", versions(run)["numbers/onnx-fp32"], *args, "--json")
    assert by_version.returncode == 0, by_version.stderr[-2000:]
    assert json.loads(by_version.stdout)["custom_outputs"]["tokens"] == expected[0]
    client = mlflow.MlflowClient(f"sqlite:///{run['artifacts'] / 'mlflow.db'}")
    client.set_registered_model_alias("tiny-llama-onnx-multi-lora", "champion", "1")
    capsys.readouterr()
    assert main(["chat", "models:/tiny-llama-onnx-multi-lora@champion", *args, "--adapter", "numbers", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["custom_outputs"]["tokens"] == expected[0]
    capsys.readouterr()
    assert main(["chat", versions(run)["numbers/onnx-fp32"], *args]) == 0  # the answer's text alone
    assert capsys.readouterr().out.strip() == json.loads(by_version.stdout)["choices"][0]["message"]["content"]
    conversation = ftd("chat", "models:/tiny-llama-onnx-multi-lora@champion", "--artifacts-dir", str(run["artifacts"]),
                       "--adapter", "imported", input=f"{question}\n{question}\n")  # fmt: skip
    assert conversation.returncode == 0 and len(conversation.stdout.strip().splitlines()) == 2
    assert main(["chat", "models:/tiny-llama-onnx-multi-lora@champion", *args, "--adapter", "nope"]) == 2
    assert (
        "custom_inputs.adapter: unknown adapter 'nope'; this model serves imported, numbers" in capsys.readouterr().err
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_scoring_server_serves_every_adapter_and_survives_bad_requests(run: dict) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "deploy", versions(run)["onnx-multi-lora"], "--artifacts-dir",
         str(run["artifacts"]), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the scoring server did not start"
                time.sleep(1)
        good = []
        for adapter in ("numbers", "imported"):
            prompts, expected = reference(run, adapter)
            for p, tokens in list(zip(prompts, expected))[:4]:
                body = {"messages": p["messages"], "max_tokens": 8, "custom_inputs": {"adapter": adapter}}
                status, answer = post(url, body)
                assert status == 200 and answer["custom_outputs"]["tokens"] == tokens, answer
                good.append((body, tokens))
        hello = [{"role": "user", "content": "hi"}]
        bad = {
            "custom_inputs.adapter: unknown adapter 'nope'": {"messages": hello, "custom_inputs": {"adapter": "nope"}},
            "messages[0].content: the prompt is empty": {"messages": [{"role": "user", "content": " "}],
                                                         "custom_inputs": {"adapter": "numbers"}},
            "max_tokens: expected a positive integer, got -3": {"messages": hello, "max_tokens": -3,
                                                                "custom_inputs": {"adapter": "numbers"}},
            "together over the model's context length": {"messages": [{"role": "user", "content": "hi " * 400}],
                                                         "custom_inputs": {"adapter": "numbers"}},
            "messages": {"messages": "not a list", "custom_inputs": {"adapter": "numbers"}},
            "max_tokens": {"messages": hello, "max_tokens": "many", "custom_inputs": {"adapter": "numbers"}},
        }  # fmt: skip
        for fragment, body in bad.items():
            status, answer = post(url, body)
            assert 400 <= status < 500 and fragment in answer["message"], (fragment, status, answer)
            status, answer = post(url, good[0][0])  # and the next good request is answered
            assert status == 200 and answer["custom_outputs"]["tokens"] == good[0][1]
        with ThreadPoolExecutor(8) as pool:  # 8 at once, across both adapters
            results = list(pool.map(lambda g: post(url, g[0]), good))
        assert [(s, a["custom_outputs"]["tokens"]) for s, a in results] == [(200, t) for _, t in good]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
