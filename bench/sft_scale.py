"""SFT where the model, not the fixed cost, dominates: ftd's SFT stage against plain TRL on a
Qwen2.5-0.5B-shaped model (random bf16 weights, the project's tokenizer), identical settings.

ftd: `ftd run` with no targets (SFT, then merge and a small reference), its adapter's own record
of tokens seen and each step's wall time. Plain: `bench/plain_pipeline.py`'s training-only
variant, the same data, LoRA, SFTConfig and seed, with one clock read per step. Rounds alternate
which runs first; the figures are tokens/s over the whole training and the step-for-step median
of plain's step time over ours (the first step, with its warm-up, left out).

    python -m bench.sft_scale                       # fp32, 2 rounds of 8 steps
    python -m bench.sft_scale --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.scale import prepare
from ftd.memory import machine_memory_bytes
from ftd.store import MANIFEST
from tasks.sft import STEP_SECONDS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SIZE = "qwen2.5-0.5b"


def config(base: Path, artifacts: Path, dtype: str, steps: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-llama.yaml").read_text())
    adapter = cfg["adapters"][0]
    adapter["data"] = {k: str(ROOT / v) if k in ("train", "eval") else v for k, v in adapter["data"].items()}
    adapter["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": adapter["lora"]["target_modules"]}
    adapter["sft"] = {"max_steps": steps, "learning_rate": 1.0e-4, "batch_size": 4, "max_length": 128,
                      "warmup_steps": 0, "scheduler": "constant", "seed": 0, "dtype": dtype}  # fmt: skip
    cfg.update(experiment=f"sft-scale-{dtype}", base_model=str(base), artifacts_dir=str(artifacts), targets=[])
    cfg["smoke"] = {"max_prompts": 4, "max_new_tokens": 2, "include_base": False}
    return cfg


def ours(base: Path, work: Path, dtype: str, steps: int) -> dict:
    artifacts = work / "ftd"
    shutil.rmtree(artifacts, ignore_errors=True)
    cfg_file = work / f"ftd-{dtype}.yaml"
    cfg_file.write_text(yaml.safe_dump(config(base, artifacts, dtype, steps), sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{artifacts}/mlflow.db"}
    with open(work / "ftd.log", "w") as log:
        subprocess.run([sys.executable, "-m", "app.cli", "run", str(cfg_file)], cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=True)  # fmt: skip
    adapter = next((artifacts / "store" / "adapter").iterdir())
    meta = json.loads((adapter / MANIFEST).read_text())["meta"]
    return {"tokens": meta["tokens_seen"], "seconds": meta["train_seconds"],
            "steps": json.loads((adapter / STEP_SECONDS).read_text())}  # fmt: skip


def plain(base: Path, work: Path, dtype: str, steps: int) -> dict:
    out, result = work / "plain", work / "plain.json"
    shutil.rmtree(out, ignore_errors=True)
    cfg_file = work / f"plain-{dtype}.yaml"
    cfg = config(base, work / "unused", dtype, steps)
    cfg["targets"] = [{"name": "unused", "precision": "fp32", "device": "cpu"}]  # read, never built (training only)
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    variant = "ftd-settings" if dtype == "float32" else "ftd-settings-bf16"
    subprocess.run([sys.executable, "-m", "bench.plain_pipeline", str(cfg_file), str(base), str(out), str(result),
                    variant], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    r = json.loads(result.read_text())
    return {"tokens": r["tokens_seen"], "seconds": r["phases"]["sft_train"], "steps": r["step_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sft_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-sft-scale")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base, _adapter, info = prepare(SIZE, ROOT / "artifacts" / "bench-scale" / SIZE, print)
    results = {}
    for dtype in args.dtypes.split(","):
        rounds = []
        for i in range(args.rounds):
            order = (("ftd", ours), ("plain", plain)) if i % 2 == 0 else (("plain", plain), ("ftd", ours))
            runs = {}
            for name, run in order:
                started = time.perf_counter()
                runs[name] = run(base, args.work, dtype, args.steps)
                print(f"[{time.strftime('%H:%M:%S')}] {dtype} round {i + 1} {name}: "
                      f"{runs[name]['tokens'] / runs[name]['seconds']:.1f} tokens/s "
                      f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)  # fmt: skip
            if runs["ftd"]["tokens"] != runs["plain"]["tokens"]:
                raise RuntimeError(f"not the same training: {runs['ftd']['tokens']} vs {runs['plain']['tokens']} tokens")
            step_ratios = [p / o for p, o in zip(runs["plain"]["steps"][1:], runs["ftd"]["steps"][1:])]
            rounds.append({
                "ftd_tokens_per_s": runs["ftd"]["tokens"] / runs["ftd"]["seconds"],
                "plain_tokens_per_s": runs["plain"]["tokens"] / runs["plain"]["seconds"],
                "step_ratio": statistics.median(step_ratios),
                "ftd_median_step_s": statistics.median(runs["ftd"]["steps"][1:]),
                "plain_median_step_s": statistics.median(runs["plain"]["steps"][1:]),
                "tokens": runs["ftd"]["tokens"],
            })  # fmt: skip
        ratios = [r["ftd_tokens_per_s"] / r["plain_tokens_per_s"] for r in rounds]
        results[dtype] = {"rounds": rounds, "ratio_median": statistics.median(ratios), "ratios": ratios,
                          "step_ratio_median": statistics.median(r["step_ratio"] for r in rounds)}  # fmt: skip
    machine = {"cpus": os.cpu_count(), "ram_gb": (machine_memory_bytes() or 0) / 2**30,
               "torch_threads": _torch_threads()}  # fmt: skip
    record = {"machine": machine, "model": SIZE, "parameters": info["parameters"], "steps": args.steps,
              "batch_size": 4, "max_length": 128, "results": results}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sft-scale.json").write_text(json.dumps(record, indent=2))
    lines = [f"# SFT on a {info['parameters'] / 1e9:.2f}B-parameter model: ftd vs plain TRL", "",
             f"{SIZE} shape, LoRA r=16 on 7 projections, batch 4, max_length 128, {args.steps} steps, "
             f"{machine['cpus']} CPUs ({machine['torch_threads']} torch threads); {args.rounds} rounds, alternating.", "",
             "| dtype | ftd tokens/s | plain tokens/s | ratio (median) | step for step (median) | median step ftd / plain |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for dtype, r in results.items():
        f = statistics.median(x["ftd_tokens_per_s"] for x in r["rounds"])
        p = statistics.median(x["plain_tokens_per_s"] for x in r["rounds"])
        fs = statistics.median(x["ftd_median_step_s"] for x in r["rounds"])
        ps = statistics.median(x["plain_median_step_s"] for x in r["rounds"])
        lines.append(f"| {dtype} | {f:.1f} | {p:.1f} | {r['ratio_median']:.3f} ({', '.join(f'{x:.3f}' for x in r['ratios'])}) "
                     f"| {r['step_ratio_median']:.3f} | {fs:.2f} s / {ps:.2f} s |")  # fmt: skip
    (RESULTS / "sft-scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
