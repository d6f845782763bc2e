"""Real model sizes: the deploy chain run by `ftd run` on synthetic real-shape checkpoints.

For each size: a checkpoint with a hub model's real config (random weights, bf16, sharded like the
hub's; the project's own 512-token tokenizer, smaller than the model's vocabulary) and a random
r=16 LoRA adapter on all 7 projections. The chain is the one a user with an adapter trained
elsewhere runs on a deploy machine: import → streaming merge → og int4 engine and llama.cpp
q4_k_m → PyTorch reference (16 prompts × 8 tokens) → parity gate on each engine → registration.
Each stage's wall time and peak RSS come from the run's own stage records (ftd.memory); the
target is a peak ≤ 1.3 × the largest model the stage holds + 1 GB (the checkpoint for merge,
builds and reference; the engine for a smoke test).

    python -m bench.scale                         # llama-60m, qwen2.5-0.5b and qwen2-1.5b (~12 min)
    python -m bench.scale --sizes llama-2-7b      # the 7B-class chain (~1 h on 2 cores, ~60 GB of disk)

Each size's result lands in bench/results/scale/SIZE.json; bench/results/scale.md is rebuilt from
every size there.

The gate's thresholds are wide open: the weights are random, so agreement says nothing about an
engine here (the default experiment's gates do); the run measures time and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.synth import REAL_SHAPES, write_adapter, write_checkpoint
from ftd.memory import machine_memory_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SIZES = ("llama-60m", "qwen2.5-0.5b", "qwen2-1.5b")
SHARD_BYTES = 4_000_000_000
GB = 1e9


def experiment_config(name: str, base: Path, adapter: Path, artifacts: Path) -> dict:
    data = {"train": str(ROOT / "data/numbers/train.jsonl"), "eval": str(ROOT / "data/numbers/eval.jsonl"),
            "messages_field": "messages"}  # fmt: skip
    open_gate = {"min_accuracy": 0.0, "min_agreement": 0.0, "max_logit_diff": 1.0e9}
    return {
        "experiment": f"scale-{name.replace('.', '-')}",
        "base_model": str(base),
        "artifacts_dir": str(artifacts),
        "adapters": [{"name": "synthetic", "import_from": str(adapter), "data": data}],
        "targets": [
            {"name": "og-int4", "backend": "onnx_genai", "precision": "int4", "device": "cpu"},
            {"name": "gguf-q4km", "backend": "llama_cpp", "precision": "q4_k_m"},
        ],
        "smoke": {"max_prompts": 16, "max_new_tokens": 8, "thresholds": open_gate},
    }


def prepare(name: str, work: Path, log) -> tuple[Path, Path, dict]:
    """The synthetic checkpoint (with the project's tokenizer) and adapter, written once per work dir."""
    from ftd.builtin_models import TinyRecipe, train_tokenizer

    base, adapter = work / "base", work / "adapter"
    config = REAL_SHAPES[name]()
    info_file = work / "synth.json"
    if not info_file.is_file():
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        info = write_checkpoint(base, config, SHARD_BYTES, dtype="bfloat16")
        train_tokenizer(TinyRecipe(architecture="LlamaForCausalLM")).save_pretrained(base)
        info["adapter"] = write_adapter(adapter, config, r=16, alpha=32)
        info["seconds"] = round(time.perf_counter() - started, 1)
        info_file.write_text(json.dumps(info))
        log(f"{name}: wrote {info['parameters'] / 1e9:.2f}B parameters ({info['bytes'] / GB:.2f} GB bf16, "
            f"{info['shards']} shards) in {info['seconds']} s")  # fmt: skip
    return base, adapter, json.loads(info_file.read_text())


def run_chain(name: str, work: Path, log) -> dict:
    import yaml

    base, adapter, info = prepare(name, work, log)
    artifacts = work / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)  # a cold chain every time
    config_file = work / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(experiment_config(name, base, adapter, artifacts), sort_keys=False))
    summary_file = work / "summary.json"
    summary_file.unlink(missing_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{artifacts}/mlflow.db"}
    started = time.perf_counter()
    with open(work / "run.log", "w") as out:
        code = subprocess.call([sys.executable, "-m", "app.cli", "run", str(config_file), "--summary",
                                str(summary_file)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    seconds = time.perf_counter() - started
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    log(f"{name}: ftd run exited {code} after {seconds:.0f} s")
    return {"size": name, "exit_code": code, "seconds": round(seconds, 1), "checkpoint_bytes": info["bytes"],
            "parameters": info["parameters"], "stages": summary.get("stages", []),
            "engines": engine_sizes(artifacts)}  # fmt: skip


def engine_sizes(artifacts: Path) -> dict:
    """Bytes of each built engine folder in the store (the smoke test holds one of them)."""
    sizes = {}
    for stage in ("engine", "gguf-quant", "gguf-bundle"):
        for folder in (artifacts / "store" / stage).glob("*") if (artifacts / "store" / stage).is_dir() else []:
            sizes[f"{stage}/{folder.name[:12]}"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return sizes


def held_bytes(stage: dict, result: dict) -> int:
    """The largest model a stage must hold: the engine for a smoke test, else the checkpoint."""
    if stage["stage"] == "smoke":
        return max(result["engines"].values(), default=result["checkpoint_bytes"])
    return result["checkpoint_bytes"]


def markdown(results: list[dict], machine: dict) -> str:
    lines = [
        "# Real model sizes: the deploy chain per stage",
        "",
        f"Generated by `python -m bench.scale` on {machine['cpus']} CPUs, {machine['ram_gb']:.1f} GB RAM. "
        "Each row is one stage of one cold `ftd run` (imported r=16 adapter → merge → og int4 and llama.cpp "
        "q4_k_m → reference on 16 prompts × 8 tokens → gate); peak RSS is the stage's own (ftd.memory). "
        "Target: peak ≤ 1.3 × held + 1 GB, where held is the checkpoint (the engine for a smoke test).",
        "",
    ]
    for r in results:
        lines += [f"## {r['size']}: {r['parameters'] / 1e9:.2f}B parameters, {r['checkpoint_bytes'] / GB:.2f} GB bf16",
                  "", f"`ftd run` exit code {r['exit_code']}, {r['seconds']:.0f} s in all.", "",
                  "| stage | item | seconds | peak RSS | held | peak / held | target met |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in r["stages"]:
            peak = s.get("peak_rss_mb")
            if peak is None:
                lines.append(f"| {s['stage']} | {s['label']} | {s['seconds']:.1f} | - ({s['status']}) | | | |")
                continue
            held = held_bytes(s, r)
            met = peak * 1e6 <= 1.3 * held + GB
            lines.append(f"| {s['stage']} | {s['label']} | {s['seconds']:.1f} | {peak / 1000:.2f} GB | "
                         f"{held / GB:.2f} GB | {peak * 1e6 / held:.2f} | {'yes' if met else '**no**'} |")  # fmt: skip
        lines.append("")
        if r.get("reference_scaling"):
            rows = r["reference_scaling"]["rows"]
            first = rows[0]
            lines += ["Reference stage alone (batch 16), its time against prompts × new tokens:", "",
                      "| prompts | new tokens | seconds | time ratio | prompts × tokens ratio |", "|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {x['prompts']} | {x['tokens']} | {x['seconds']:.1f} | {x['seconds'] / first['seconds']:.2f} | "
                      f"{x['prompts'] * x['tokens'] / (first['prompts'] * first['tokens']):.2f} |" for x in rows]  # fmt: skip
            lines.append("")
    return "\n".join(lines)


def reference_scaling(work: Path, log) -> dict:
    """The reference stage alone on one size's stored chain, for 8 to 64 prompts and 4 to 16 new
    tokens: with batching its time should grow slower than prompts x tokens."""
    import subprocess as sp

    code = """
import json, shutil, sys, time
from pathlib import Path
from ftd.config import SmokeSettings
from ftd.store import Store
from tasks.smoke import reference_outputs
root = Path(sys.argv[1]); store = Store(root)
one = lambda stage: store.load(stage, next((root / "store" / stage).iterdir()).name)
base, adapter, merged, data = one("base"), one("adapter"), one("merged"), one("data")
shutil.rmtree(root / "store" / "reference")  # the chain's own (16 prompts, 8 tokens) is timed again
out = []
for prompts, tokens in ((8, 8), (16, 8), (32, 8), (64, 8), (16, 4), (16, 16)):
    settings = SmokeSettings(max_prompts=prompts, max_new_tokens=tokens)
    started = time.perf_counter()
    reference_outputs(base, adapter, merged, data, settings, store)
    out.append({"prompts": prompts, "tokens": tokens, "seconds": round(time.perf_counter() - started, 2)})
    print(out[-1], flush=True)
print(json.dumps(out))
"""
    proc = sp.run([sys.executable, "-c", code, str(work / "artifacts")], cwd=ROOT, capture_output=True, text=True,
                  check=True)  # fmt: skip
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"reference scaling: {rows}")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"any of {', '.join(REAL_SHAPES)}")
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-scale")
    parser.add_argument("--keep", action="store_true", help="keep each size's artifacts folder (store, MLflow)")
    parser.add_argument("--reference-scaling", action="store_true",
                        help="after each size's chain, time its reference stage for 8-64 prompts and 4-16 tokens")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in REAL_SHAPES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {', '.join(REAL_SHAPES)}")

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    machine = {"cpus": os.cpu_count(), "ram_gb": (machine_memory_bytes() or 0) / 2**30}
    folder = RESULTS / "scale"
    folder.mkdir(parents=True, exist_ok=True)
    codes = []
    for size in sizes:  # each size's result is written as soon as it is measured
        result = run_chain(size, args.work / size, log)
        if args.reference_scaling and result["exit_code"] == 0:
            result["reference_scaling"] = reference_scaling(args.work / size, log)
        (folder / f"{size}.json").write_text(json.dumps({"machine": machine, **result}, indent=2))
        codes.append(result["exit_code"])
        if not args.keep:
            shutil.rmtree(args.work / size / "artifacts", ignore_errors=True)  # tens of GB at 7B
    # the page lists every size measured so far, smallest first
    every = sorted((json.loads(f.read_text()) for f in folder.glob("*.json")), key=lambda r: r["parameters"])
    (RESULTS / "scale.md").write_text(markdown(every, machine))
    print(markdown(every, machine))
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
