"""`ftd chat` and `ftd deploy`: what was registered, called the way a user or an application does.

Both take a registry URI (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) and read the registry of
`$MLFLOW_TRACKING_URI`, else the artifacts folder's MLflow database. A registered engine version
is an MLflow chat Model (tasks/serving): `chat` loads it in this process, `deploy` starts MLflow's
own scoring server on it (`mlflow models serve --env-manager local`, on 127.0.0.1).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from ftd.errors import ConfigError, FtdError
from ftd.tracking import default_tracking_uri


def load(model_uri: str, artifacts_dir: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ConfigError(f"model: expected models:/NAME/VERSION or models:/NAME@ALIAS, got {model_uri!r}")
    mlflow.set_tracking_uri(default_tracking_uri(artifacts_dir))
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:  # unknown name/version/alias, or a version registered as a plain folder
        raise FtdError(f"{model_uri}: {exc.message.splitlines()[0]} (see its tag ftd.servable)") from None


def chat(args) -> int:
    from mlflow.exceptions import MlflowException

    model = load(args.model, args.artifacts_dir)
    first = [{"role": "system", "content": args.system}] if args.system else []
    params = {"max_tokens": args.max_tokens, **({"custom_inputs": {"adapter": args.adapter}} if args.adapter else {})}
    if args.prompt is not None:
        try:
            response = model.predict({"messages": [*first, {"role": "user", "content": args.prompt}], **params})
        except MlflowException as exc:
            raise ConfigError(_request_error(exc)) from None
        print(json.dumps(response, indent=2) if args.json else response["choices"][0]["message"]["content"])
        return 0
    history = list(first)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = []
        print("ftd> " if interactive else "", end="", flush=True)
        try:  # tokens are shown as they are generated
            for chunk in model.predict_stream({"messages": history, **params}):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                answer.append(piece)
                print(piece, end="", flush=True)
        except MlflowException as exc:
            history.pop()
            print(f"\nftd: {_request_error(exc)}", file=sys.stderr)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def _request_error(exc) -> str:
    return exc.message.splitlines()[-1].removeprefix("Error: ")


def deploy(args) -> int:
    from ftd.servers import start_model_server, stop_servers, wait_healthy

    load(args.model, args.artifacts_dir)  # a wrong URI or a plain folder fails here, in one line
    server = start_model_server(args.model, default_tracking_uri(args.artifacts_dir), args.port,
                                Path(args.artifacts_dir) / "logs")  # fmt: skip
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        wait_healthy([server], timeout=300)
        url = server.ui_url
        print(f"ftd: serving {args.model} at {url}/invocations (OpenAI chat-completions request body)", flush=True)
        example = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16})
        print(f"ftd: curl -s {url}/invocations -H 'Content-Type: application/json' -d '{example}'", flush=True)
        while not stopping and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop_servers([server])
    return 0
