"""Benchmark harness: `python -m bench.run [--quick]` from the repository root.

1. Merge: peak RSS and wall time of `tasks.merge.stream_merge` vs peft `merge_and_unload` +
   `save_pretrained` on a synthetic multi-shard fp32 Llama checkpoint with an r=16 LoRA on all 7
   projections; each merge in its own process (peak RSS: that process's VmHWM), outputs compared bitwise.
   Then stream_merge alone on larger checkpoints (one above half of RAM when disk and time allow).
2. Decode: batch 1 greedy tokens/s of transformers `generate`, onnxruntime-genai fp32 and int4
   engines (og model builder) and the multi-LoRA engine (adapter active) vs the merged fp32 engine,
   each also as a fraction of the single-thread memory-bandwidth bound.

Every figure is the median of several runs with min–max; each ratio is taken per round (candidate
and baseline measured back to back) and reported as the median of those. Writes
bench/results/latest.json and bench/results/latest.md and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import synth
from bench.pipeline import bench_pipeline, pipeline_markdown, pipeline_targets
from bench.stats import fmt, stats

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 1e6
GB = 1e9

ENGINE_NAMES = ("fp32", "int4", "multi-lora", "multi-lora-int4")
FULL = {
    # 2.17 GB fp32 in 5 shards. At 1.35 GB (4 layers) ours took 0.44-0.59 of peft's time: fixed
    # costs weigh more on a smaller checkpoint, and the target (<= 0.5 at >= 1 GB) would hang on noise.
    "merge": {"hidden": 2048, "intermediate": 5632, "layers": 8, "vocab": 32000, "heads": 16},
    "shard_bytes": 500 * 2**20,
    "merge_repeats": 3,
    "scaling": True,
    "decode": [
        # in L3 on this machine: engine overheads show; every engine kind
        {
            "name": "medium",
            "hidden": 512,
            "intermediate": 1536,
            "layers": 8,
            "vocab": 32000,
            "heads": 8,
            "engines": list(ENGINE_NAMES),
            "new_tokens": 64,
            "passes": 3,  # per process: the median of 3 generations (each 0.15-1.2 s)
            "pair_passes": 6,  # multi-LoRA beside merged: 6 generations each, alternating
            "repeats": 3,
        },
        # int4 weights (~430 MB) beyond the L3: the DRAM bandwidth bound binds
        {
            "name": "large",
            "hidden": 2048,
            "intermediate": 5632,
            "layers": 12,
            "vocab": 32000,
            "heads": 16,
            "engines": ["int4", "multi-lora-int4"],
            "new_tokens": 32,
            "passes": 1,
            "pair_passes": 6,
            "repeats": 3,
        },
    ],  # fmt: skip
    "bandwidth_bytes": 2**30,
}
QUICK = {
    "merge": {"hidden": 256, "intermediate": 688, "layers": 2, "vocab": 8000, "heads": 4},
    "shard_bytes": 8 * 2**20,
    "merge_repeats": 3,
    "scaling": False,
    "decode": [
        {
            "name": "medium",
            "hidden": 128,
            "intermediate": 352,
            "layers": 2,
            "vocab": 4000,
            "heads": 4,
            "engines": list(ENGINE_NAMES),
            "new_tokens": 32,
            "pair_passes": 2,
            "repeats": 2,
        },
        {
            "name": "large",
            "hidden": 256,
            "intermediate": 688,
            "layers": 2,
            "vocab": 4000,
            "heads": 4,
            "engines": ["int4", "multi-lora-int4"],
            "new_tokens": 16,
            "pair_passes": 2,
            "repeats": 2,
        },
    ],  # fmt: skip
    "bandwidth_bytes": 2**28,
}
# Scaling checkpoints: Llama-7B-shaped layers (810 MB fp32 each) so shards stay ~500 MB.
SCALE_DIMS = {"hidden": 4096, "intermediate": 11008, "vocab": 32000, "heads": 32}
MEDIUM_LAYERS = 3  # ~3.5 GB


# ---------------------------------------------------------------- helpers


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return {
        "cpu": model[1].strip() if model else platform.processor(),
        "l3_cache_bytes": _l3_bytes(cpuinfo),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem[1]) / 2**20, 1) if mem else None,
        "ram_bytes": int(mem[1]) * 1024 if mem else None,
        "python": platform.python_version(),
        "libraries": _versions("torch", "transformers", "peft", "safetensors", "onnxruntime", "onnxruntime-genai"),
    }


def _l3_bytes(cpuinfo: str) -> int | None:
    index3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    text = index3.read_text().strip() if index3.is_file() else None
    if text is None:
        found = re.search(r"^cache size\s*:\s*(\S+ ?\S*)$", cpuinfo, re.M)
        text = found[1].replace(" ", "") if found else None
    match = re.fullmatch(r"(\d+)([KMG]?)B?", text or "")
    return int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]] if match else None


def _versions(*names: str) -> dict:
    from importlib.metadata import version

    return {n: version(n) for n in names}


def run_child(job: str, args: dict, work: Path, threads: int | None = None) -> tuple[dict, float]:
    """Run one job in a fresh process: its result (with the job's own peak RSS) and wall seconds."""
    result_file = work / f".child-{job}-{time.monotonic_ns()}.json"
    command = [sys.executable, "-m", "bench.child", job, json.dumps(args), str(result_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {job} failed ({proc.returncode}):\n{output.decode()[-3000:]}")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result, wall


def read_bandwidth(nbytes: int, threads: int = 1, repeats: int = 5) -> dict:
    """Read bandwidth with the engines' thread count, over arrays much larger than the caches: the
    fastest of numpy sums (one thread) and a torch fp32 GEMV (`threads` threads: a GEMV reads every
    weight once, like a decode step). The fastest reader makes the tightest, honest bound."""
    import numpy as np
    import torch

    def measure(read) -> dict:
        read()
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            read()
            rates.append(nbytes / (time.perf_counter() - started) / GB)
        return stats(rates)

    best = {}
    for dtype in (np.float32, np.float64):
        array = np.ones(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
        best[f"numpy {np.dtype(dtype).name} sum, 1 thread"] = measure(array.sum)
        del array
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    matrix = torch.ones(16384, nbytes // 4 // 16384)
    vector = torch.ones(matrix.shape[1])
    best[f"torch fp32 GEMV, {threads} thread(s)"] = measure(functools.partial(torch.mv, matrix, vector))
    del matrix, vector
    torch.set_num_threads(previous)
    used = max(best, key=lambda k: best[k]["median"])
    return {"gb_per_s": best[used]["median"], "method": used, "by_method": best, "array_bytes": nbytes}


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def tensors_bitwise_equal(dir_a: Path, dir_b: Path) -> dict:
    """Every tensor of both checkpoints, compared bit for bit (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        names = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                names.update({n: shard for n in f.keys()})  # noqa: SIM118
        return names

    a, b = index(dir_a), index(dir_b)
    if sorted(a) != sorted(b):
        return {"equal": False, "reason": f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}", "tensors": 0}
    differing = []
    for name in a:
        with safe_open(a[name], framework="pt") as fa, safe_open(b[name], framework="pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta.view(torch.int32), tb.view(torch.int32))
        if not same:
            differing.append(name)
    return {"equal": not differing, "tensors": len(a), "differing": differing[:10]}


# ---------------------------------------------------------------- 1. merge


def bench_merge(work: Path, plan: dict, log) -> dict:
    dims = plan["merge"]
    config = synth.llama_config(dims["hidden"], dims["intermediate"], dims["layers"], dims["vocab"], dims["heads"])
    base, adapter = work / "merge-base", work / "merge-adapter"
    started = time.perf_counter()
    ckpt = synth.write_checkpoint(base, config, plan["shard_bytes"])
    lora = synth.write_adapter(adapter, config)
    log(f"merge: wrote {ckpt['bytes'] / GB:.2f} GB in {ckpt['shards']} shards in {time.perf_counter() - started:.0f}s")
    runs: dict[str, list] = {"ours": [], "peft": []}
    for round_ in range(plan["merge_repeats"]):
        order = ("peft", "ours") if round_ % 2 == 0 else ("ours", "peft")
        for who in order:
            out = work / f"merged-{who}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # every run starts with no dirty pages: the earlier runs' writeback is not its cost
            result, wall = run_child(f"merge-{who}", {"base": str(base), "adapter": str(adapter), "out": str(out)}, work)  # fmt: skip
            rss = result["peak_rss_mb"]
            runs[who].append({"peak_rss_mb": rss, "seconds": result["seconds"], "process_seconds": wall,
                              "rss_after_imports_mb": result["rss_after_imports_mb"]})  # fmt: skip
            log(f"merge round {round_ + 1} {who}: peak RSS {rss:.0f} MB, {result['seconds']:.1f}s")
    equal = tensors_bitwise_equal(work / "merged-ours", work / "merged-peft")
    log(f"merge: outputs bitwise equal: {equal['equal']} ({equal['tensors']} tensors)")
    for who in runs:
        shutil.rmtree(work / f"merged-{who}", ignore_errors=True)
    shutil.rmtree(base)

    def field(who: str, key: str) -> dict:
        return stats([r[key] for r in runs[who]])

    def ratio(key: str) -> dict:
        return stats([o[key] / p[key] for o, p in zip(runs["ours"], runs["peft"], strict=True)])

    return {
        "checkpoint": {
            "bytes": ckpt["bytes"],
            "shards": ckpt["shards"],
            "parameters": ckpt["parameters"],
            "config": dims,
            "shard_bytes": plan["shard_bytes"],
        },  # fmt: skip
        "adapter": {"r": 16, "alpha": 32, "targets": synth.LLAMA_TARGETS, **lora},
        "ours": {
            "peak_rss_mb": field("ours", "peak_rss_mb"),
            "seconds": field("ours", "seconds"),
            "rss_after_imports_mb": field("ours", "rss_after_imports_mb"),
        },  # fmt: skip
        "peft": {
            "peak_rss_mb": field("peft", "peak_rss_mb"),
            "seconds": field("peft", "seconds"),
            "rss_after_imports_mb": field("peft", "rss_after_imports_mb"),
        },  # fmt: skip
        "ratio": {"peak_rss": ratio("peak_rss_mb"), "seconds": ratio("seconds")},
        "bitwise_equal": equal,
        "runs": runs,
    }


def scaling_checkpoint(work: Path, layers: int, repeats: int, shard_bytes: int, log) -> dict:
    d = SCALE_DIMS
    config = synth.llama_config(d["hidden"], d["intermediate"], layers, d["vocab"], d["heads"])
    base, adapter, out = work / f"scale-{layers}-base", work / f"scale-{layers}-adapter", work / f"scale-{layers}-out"
    started = time.perf_counter()
    ckpt = synth.write_checkpoint(base, config, shard_bytes)
    synth.write_adapter(adapter, config)
    write_seconds = time.perf_counter() - started
    log(f"scaling: wrote {ckpt['bytes'] / GB:.2f} GB ({ckpt['shards']} shards) in {write_seconds:.0f}s")
    runs = []
    try:
        for i in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            result, _ = run_child("merge-ours", {"base": str(base), "adapter": str(adapter), "out": str(out)}, work)
            rss = result["peak_rss_mb"]
            runs.append({"peak_rss_mb": rss, "seconds": result["seconds"]})
            log(f"scaling {ckpt['bytes'] / GB:.1f} GB run {i + 1}: peak RSS {rss:.0f} MB, {result['seconds']:.1f}s")
    finally:
        for path in (base, adapter, out):
            shutil.rmtree(path, ignore_errors=True)
    return {
        "checkpoint_bytes": ckpt["bytes"],
        "shards": ckpt["shards"],
        "layers": layers,
        "write_seconds": write_seconds,
        "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs]),
        "seconds": stats([r["seconds"] for r in runs]),
        "rss_over_checkpoint": stats([r["peak_rss_mb"] * MB / ckpt["bytes"] for r in runs]),
    }


def bench_scaling(work: Path, plan: dict, ram_bytes: int, log, skip_large: bool) -> tuple[list, list]:
    """Peak RSS of the streaming merge at ~3.5 GB and just above half of RAM (where peft cannot
    load the model), two runs each (the peak RSS of a run varies by ~1 MB; the time is reported,
    not a target). The large point always runs: it is the figure that shows RSS stays flat; only
    a lack of disk space or `--skip-large` skips it, and the report says which."""
    results, skipped = [], []
    if not plan["scaling"]:
        return results, ["scaling checkpoints (~3.5 GB and > ½ RAM): skipped by --quick"]
    d = SCALE_DIMS
    per_layer = synth.checkpoint_bytes(synth.llama_config(d["hidden"], d["intermediate"], 1, d["vocab"], d["heads"]))
    embeds = 2 * d["vocab"] * d["hidden"] * 4
    per_layer -= embeds
    large_layers = math.ceil((0.52 * ram_bytes - embeds) / per_layer)
    for layers, repeats in ((MEDIUM_LAYERS, 2), (large_layers, 2)):
        size = embeds + layers * per_layer
        if layers == large_layers and skip_large:
            skipped.append(f"{size / GB:.1f} GB checkpoint (> ½ RAM): --skip-large")
            continue
        need = 2 * size + 8 * GB  # base + merged output, with room for everyone else
        if free_bytes(work) < need:
            skipped.append(
                f"{size / GB:.1f} GB checkpoint: {free_bytes(work) / GB:.0f} GB free on {work}, needs {need / GB:.0f} GB"
            )
            continue
        results.append(scaling_checkpoint(work, layers, repeats, FULL["shard_bytes"], log))
    return results, skipped


# ---------------------------------------------------------------- 2. decode


def build_engine(hf_dir: Path, out: Path, precision: str, work: Path) -> float:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(work / ".builder-cache")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"og builder ({precision}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - started


def set_threads(genai_config: Path, threads: int) -> None:
    config = json.loads(genai_config.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    genai_config.write_text(json.dumps(config, indent=4) + "\n")


_BITS = {16: 4, 17: 4}  # onnx INT4 / UINT4


def graph_weight_bytes(model_path: Path) -> dict:
    """Bytes of the graph's initializers read per decode step: all, except tables only gathered from
    (the embedding: one row per token)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    read = gathered = 0
    for init in model.graph.initializer:
        bits = _BITS.get(init.data_type) or helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * 8
        nbytes = math.prod(init.dims) * bits // 8
        ops = consumers[init.name]
        if ops and all(op.startswith("Gather") for op in ops):
            gathered += nbytes
        else:
            read += nbytes
    return {"read_bytes": read, "gathered_bytes": gathered}


def add_adapter(engine: Path, base_dir: Path, adapter_dir: Path, out_file: Path) -> int:
    """Make `engine` (the base model's og graph) a multi-LoRA graph as ftd does (tasks.backends.onnx_genai.lora_graph) and
    export the adapter for it; returns the adapter's bytes (read on every decode step)."""
    from tasks.backends.onnx_genai import lora_graph
    from tasks.backends.onnx_genai.multi_lora import write_onnx_adapter
    from tasks.merge import read_adapter

    config, pairs = read_adapter(adapter_dir)
    base_config = json.loads((base_dir / "config.json").read_text())
    specs = lora_graph.add_lora_branches(engine / "model.onnx", base_config, sorted(synth.LLAMA_TARGETS))
    arrays = lora_graph.adapter_arrays(specs, config, pairs, "bench")
    write_onnx_adapter(arrays, out_file)
    return sum(array.nbytes for array in arrays.values())


# Every engine the decode benchmark can build: (model: base or merged, precision).
# fp32 and int4 are the merged model's engines (what a merge deploys); the multi-LoRA engines are the
# base model's graph with LoRA branches whose weights come from the adapter. transformers runs the
# merged model too.
ENGINE_SPECS = {
    "fp32": ("merged", "fp32"),
    "int4": ("merged", "int4"),
    "multi-lora": ("base", "fp32"),
    "multi-lora-int4": ("base", "int4"),
}
MULTI_LORA = {"multi-lora": "fp32", "multi-lora-int4": "int4"}  # each against the merged engine of its precision


def decode_model_record(spec: dict, info: dict, prompt: list[int]) -> dict:
    """What a decode benchmark's results say about its model (shared with bench/llama_cpp.py)."""
    return {
        "config": {k: spec[k] for k in ("hidden", "intermediate", "layers", "vocab", "heads")},
        "parameters": info["parameters"],
        "prompt_tokens": len(prompt),
        "new_tokens": spec["new_tokens"],
        "adapter": "r=16, all 7 projections, random non-zero B",
    }


def bench_decode(work: Path, spec: dict, threads: int, bandwidth_bytes: int, log) -> dict:
    """Batch-1 greedy decode of `spec["engines"]` and transformers `generate` on one random Llama.
    The read bandwidth is measured again before every round, and each run's fraction of the bound
    uses its own round's: this shared host's speed moves within a run."""
    import random

    from ftd.config import MergeSettings
    from tasks.merge import stream_merge

    work = work / f"decode-{spec['name']}"
    config = synth.llama_config(spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"], spec["heads"])
    dirs = {"base": work / "base", "merged": work / "merged"}
    adapter = work / "adapter"
    info = synth.write_decode_model(dirs["base"], config)
    synth.write_adapter(adapter, config, std=0.05)
    dirs["merged"].mkdir()
    stream_merge(dirs["base"], adapter, dirs["merged"], MergeSettings())
    engines, builds, adapter_files, weight_bytes = {}, {}, {}, {}
    for name in spec["engines"]:
        model, precision = ENGINE_SPECS[name]
        engines[name] = work / f"engine-{name}"
        builds[name] = build_engine(dirs[model], engines[name], precision, work)
        set_threads(engines[name] / "genai_config.json", threads)
        extra_bytes = 0
        if name in MULTI_LORA:  # LoRA branches, their weights (fp32 at every precision) in an .onnx_adapter
            adapter_files[name] = work / f"{name}.onnx_adapter"
            extra_bytes = add_adapter(engines[name], dirs["base"], adapter, adapter_files[name])
        weight_bytes[name] = graph_weight_bytes(engines[name] / "model.onnx")["read_bytes"] + extra_bytes
    log(f"decode {spec['name']}: engines built in " + ", ".join(f"{k} {v:.0f}s" for k, v in builds.items()))
    weight_bytes["transformers"] = sum(
        math.prod(s) * 4 for n, s in synth.shapes_of(config).items() if "embed_tokens" not in n
    )
    prompt = random.Random(0).sample(range(10, 500), 16)
    common = {"prompt": prompt, "new_tokens": spec["new_tokens"], "passes": spec.get("passes", 1), "threads": threads}
    jobs = {"transformers": ("decode-hf", {"model": str(dirs["merged"]), **common})}
    for name in spec["engines"]:
        if name in MULTI_LORA:  # beside its merged engine in one process, generations alternating
            merged = MULTI_LORA[name]
            if merged not in spec["engines"]:
                raise ValueError(f"decode plan {spec['name']}: {name} needs {merged} beside it")
            jobs[name] = ("decode-og-pair", {"model": str(engines[merged]), "multi_model": str(engines[name]),
                                             "adapter_file": str(adapter_files[name]), **common,
                                             "passes": spec["pair_passes"]})  # fmt: skip
        else:
            jobs[name] = ("decode-og", {"model": str(engines[name]), **common})
    runs: dict[str, list] = {name: [] for name in jobs}
    pair_ratios: dict[str, list] = {name: [] for name in jobs if name in MULTI_LORA}
    tokens: dict[str, list] = {}
    names = list(jobs)
    bandwidths: list[dict] = []
    for round_ in range(spec["repeats"]):
        bandwidths.append(read_bandwidth(bandwidth_bytes, threads, repeats=3))
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotate the order per round
            job, args = jobs[name]
            result, _ = run_child(job, args, work, threads)
            if name in pair_ratios:
                runs[name].append(result["multi_tokens_per_s"])
                pair_ratios[name].append(result["ms_per_token_ratio"])
                tokens[name] = result["tokens"]["multi"]
            else:
                runs[name].append(result["tokens_per_s"])
                tokens[name] = result["tokens"]
        log(f"decode {spec['name']} round {round_ + 1} (read bandwidth {bandwidths[-1]['gb_per_s']:.1f} GB/s): "
            + ", ".join(f"{n} {runs[n][-1]:.1f} tok/s" for n in names)
            + "".join(f"; {n} / {MULTI_LORA[n]} {pair_ratios[n][-1]:.3f}× time/token" for n in pair_ratios))  # fmt: skip

    bw = [b["gb_per_s"] * GB for b in bandwidths]
    bw_median = stats(bw)["median"]
    engines_out = {}
    for name in names:
        engines_out[name] = {
            "tokens_per_s": stats(runs[name]),
            "ms_per_token": stats([1000 / r for r in runs[name]]),
            "weight_bytes_per_token": weight_bytes[name],
            "bound_tokens_per_s": bw_median / weight_bytes[name],
            "fraction_of_bound": stats([r * weight_bytes[name] / b for r, b in zip(runs[name], bw, strict=True)]),
        }

    def per_round(a: str, b: str) -> dict:
        return stats([x / y for x, y in zip(runs[a], runs[b], strict=True)])

    def agreement(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(tokens[a], tokens[b], strict=False)) / max(1, len(tokens[a]))

    ratio = {f"{n}_over_transformers_tokens_per_s": per_round(n, "transformers") for n in ("fp32", "int4") if n in runs}
    # time per token of multi-LoRA over merged, per process: the median of its alternating passes
    ratio |= {f"{m}_over_{MULTI_LORA[m]}_ms_per_token": stats(v) for m, v in pair_ratios.items()}
    agree = {"og fp32 vs transformers": ("fp32", "transformers"), "multi-lora vs merged fp32": ("multi-lora", "fp32"),
             "multi-lora int4 vs merged int4": ("multi-lora-int4", "int4")}  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return {
        "name": spec["name"],
        "model": decode_model_record(spec, info, prompt),
        "repeats": spec["repeats"],
        "passes": spec.get("passes", 1),
        "pair_passes": spec.get("pair_passes"),
        "build_seconds": builds,
        "bandwidth_gb_per_s": stats([b["gb_per_s"] for b in bandwidths]),
        "bandwidth_method": bandwidths[0]["method"],
        "engines": engines_out,
        "ratio": ratio,
        "greedy_token_agreement": {k: agreement(a, b) for k, (a, b) in agree.items() if a in tokens and b in tokens},
        "threads": threads,
    }


# ---------------------------------------------------------------- report


def targets(results: dict) -> list[dict]:
    rows = pipeline_targets(results["pipeline"]) if results.get("pipeline") else []
    merge = results.get("merge")
    if merge:
        r = merge["ratio"]
        rows.append(
            {
                "name": "merge peak RSS ≤ 0.35× peft",
                "value": r["peak_rss"]["median"],
                "met": r["peak_rss"]["median"] <= 0.35,
            }
        )
        rows.append(
            {"name": "merge time ≤ 0.5× peft", "value": r["seconds"]["median"], "met": r["seconds"]["median"] <= 0.5}
        )
        rows.append({"name": "merged weights bitwise equal to peft", "value": merge["bitwise_equal"]["equal"],
                     "met": merge["bitwise_equal"]["equal"]})  # fmt: skip
    ram = results["machine"]["ram_bytes"]
    large = [s for s in results.get("scaling", []) if s["checkpoint_bytes"] > ram / 2]
    rows.append({
        "name": "stream_merge of a checkpoint > ½ RAM",
        "value": large[0]["peak_rss_mb"]["median"] if large else None,
        "met": bool(large) and large[0]["peak_rss_mb"]["median"] * MB < ram / 2,
        "note": "" if large else "not run: " + "; ".join(results.get("skipped", [])),
    })  # fmt: skip
    l3 = results["machine"].get("l3_cache_bytes") or 0
    for d in results.get("decode") or []:
        r, size = d["ratio"], d["name"]
        if "int4_over_transformers_tokens_per_s" in r:
            value = r["int4_over_transformers_tokens_per_s"]["median"]
            rows.append({"name": f"int4 tokens/s ≥ 3× transformers ({size})", "value": value, "met": value >= 3})
        int4 = d["engines"].get("int4")
        if int4 and int4["weight_bytes_per_token"] > l3:  # in L3 the DRAM bound does not bind
            value = int4["fraction_of_bound"]["median"]
            rows.append({"name": f"int4 ≥ 0.8 of the bandwidth bound ({size})", "value": value, "met": value >= 0.8})
        for multi, merged in MULTI_LORA.items():
            key = f"{multi}_over_{merged}_ms_per_token"
            if key in r:
                value = r[key]["median"]
                rows.append({"name": f"{multi} time/token ≤ 1.10× merged {merged} ({size})", "value": value,
                             "met": value <= 1.10})  # fmt: skip
    return rows


TABLE_HEAD = "| benchmark | ours / candidate | baseline | ratio | target | met |"
TABLE_RULE = "|---|---|---|---|---|---|"


def decode_markdown(d: dict, results: dict, met) -> list[str]:
    e, r, md, size = d["engines"], d["ratio"], d["model"], d["name"]
    what = (f"{size}: {md['parameters'] / 1e6:.0f}M-param Llama, batch 1 greedy, {md['new_tokens']} new tokens "
            f"after {md['prompt_tokens']}, {d['repeats']} processes"
            + (f", each the median of {d['passes']} generations" if d.get("passes", 1) > 1 else ""))  # fmt: skip
    lines = ["", f"### Decode, {size} model", "",
             "fp32 and int4: engines of the merged model; multi-lora: the base graph with the adapter active "
             "(an `.onnx_adapter`); transformers generate runs the merged model.", "", TABLE_HEAD, TABLE_RULE]  # fmt: skip
    for engine in ("int4", "fp32"):
        key = f"{engine}_over_transformers_tokens_per_s"
        if key in r:
            target = f"≥ 3 | {met(f'int4 tokens/s ≥ 3× transformers ({size})')}" if engine == "int4" else "— | —"
            lines.append(
                f"| decode tokens/s, {what} | og {engine} {fmt(e[engine]['tokens_per_s'])} | transformers generate "
                f"{fmt(e['transformers']['tokens_per_s'])} | {fmt(r[key], 2)} | {target} |"
            )
            what = f"{size}, same"
    for multi, merged in MULTI_LORA.items():
        key = f"{multi}_over_{merged}_ms_per_token"
        if key in r:
            lines.append(
                f"| decode ms/token, {what}, adapter active; ratio: both engines in one process, "
                f"{d['pair_passes']} generations each, alternating | og {multi} {fmt(e[multi]['ms_per_token'], 2)} | og {merged} "
                f"{fmt(e[merged]['ms_per_token'], 2)} | {fmt(r[key], 3)} | ≤ 1.10 | "
                f"{met(f'{multi} time/token ≤ 1.10× merged {merged} ({size})')} |"
            )
            what = f"{size}, same"
    m, bw = results["machine"], results["bandwidth"]
    l3 = m.get("l3_cache_bytes") or 0
    lines += [
        "",
        f"Decode ({size}) against the memory-bandwidth bound (read bandwidth measured before each round, "
        f"{fmt(d['bandwidth_gb_per_s'], 1)} GB/s: {d['bandwidth_method']} over a {bw['array_bytes'] / 2**30:.2f} GiB "
        f"array, the fastest of: {' | '.join(bw['by_method'])}; each run's fraction uses its round's; the "
        f"engines run {d['threads']} thread(s)). The bound assumes every weight byte comes from DRAM; "
        f"weights smaller than the {_mib(l3 or None)} L3 (marked *in L3*) are largely served "
        "from cache, so their fraction can exceed 1 and the bound does not bind:",
        "",
        "| engine | tokens/s | ms/token | weights read/token (MB) | bound tokens/s | fraction of bound |",
        "|---|---|---|---|---|---|",
    ]
    for name, x in e.items():
        cached = " (*in L3*)" if x["weight_bytes_per_token"] < l3 else ""
        lines.append(
            f"| {name}{cached} | {fmt(x['tokens_per_s'])} | {fmt(x['ms_per_token'], 2)} | "
            f"{x['weight_bytes_per_token'] / MB:.1f} | {x['bound_tokens_per_s']:.1f} | {fmt(x['fraction_of_bound'], 2)} |"
        )
    if l3 and (int4 := e.get("int4")) and int4["weight_bytes_per_token"] > l3:
        lines += [
            "",
            f"int4 ≥ 0.8 of the bandwidth bound ({size}): {met(f'int4 ≥ 0.8 of the bandwidth bound ({size})')}.",
        ]
    agree = ", ".join(f"{k} {v:.0%}" for k, v in d["greedy_token_agreement"].items())
    lines += ["", f"Greedy-token agreement (sanity, random weights): {agree}.", ""]
    return lines


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Date: {results['date']} · mode: {results['mode']} · command: `{results['command']}` · "
        f"total {results['seconds']:.0f}s ("
        + ", ".join(f"{k} {v:.0f}" for k, v in results.get("section_seconds", {}).items())
        + " s)",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, L3 {_mib(m.get('l3_cache_bytes'))} · load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in results['load_average']['start'])}, at end "
        f"{'/'.join(f'{x:.2f}' for x in results['load_average']['end'])} (other jobs shared the machine)",
        "",
        "Each figure: median (min–max) of the runs; ratios are per round (candidate and baseline back to back).",
        "",
    ]
    if results.get("pipeline"):
        lines += pipeline_markdown(results["pipeline"])
    if results.get("merge"):
        lines += ["### Merge", "", TABLE_HEAD, TABLE_RULE]
    merge = results.get("merge")
    tmap = {t["name"]: t for t in results["targets"]}

    def met(name: str) -> str:
        t = tmap.get(name)
        return "—" if t is None else ("yes" if t["met"] else "**no**")

    if merge:
        ck = merge["checkpoint"]
        what = f"{ck['bytes'] / GB:.2f} GB fp32 Llama, {ck['shards']} shards, LoRA r=16 × 7 projections"
        n = len(merge["runs"]["ours"])
        lines.append(
            f"| merge peak RSS (MB), {what}, {n} runs | `stream_merge` {fmt(merge['ours']['peak_rss_mb'], 0)} | "
            f"peft merge_and_unload + save_pretrained {fmt(merge['peft']['peak_rss_mb'], 0)} | "
            f"{fmt(merge['ratio']['peak_rss'], 3)} | ≤ 0.35 | {met('merge peak RSS ≤ 0.35× peft')} |"
        )
        lines.append(
            f"| merge wall time (s), same | {fmt(merge['ours']['seconds'], 1)} | {fmt(merge['peft']['seconds'], 1)} | "
            f"{fmt(merge['ratio']['seconds'], 3)} | ≤ 0.5 | {met('merge time ≤ 0.5× peft')} |"
        )
        eq = merge["bitwise_equal"]
        lines.append(
            f"| merged weights bitwise equal | {'equal' if eq['equal'] else 'DIFFER'} ({eq['tensors']} tensors) | "
            f"peft | — | equal | {met('merged weights bitwise equal to peft')} |"
        )
    for s in results.get("scaling", []):
        big = s["checkpoint_bytes"] > m["ram_bytes"] / 2
        lines.append(
            f"| `stream_merge` peak RSS (MB), {s['checkpoint_bytes'] / GB:.1f} GB checkpoint ({s['shards']} shards"
            f"{', > ½ RAM' if big else ''}), {len(s['peak_rss_mb']['runs'])} runs; time {fmt(s['seconds'], 0, ' s')} | "
            f"{fmt(s['peak_rss_mb'], 0)} | — | {fmt(s['rss_over_checkpoint'], 3)} of checkpoint size | "
            f"{'merges a checkpoint > ½ RAM' if big else '—'} | {met('stream_merge of a checkpoint > ½ RAM') if big else '—'} |"
        )
    for reason in results.get("skipped", []):
        lines.append(f"| skipped | {reason} | | | | |")
    for d in results.get("decode") or []:
        lines += decode_markdown(d, results, met)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small models, no scaling checkpoints (~5 min smoke check on 2 cores)"
    )
    parser.add_argument("--only", choices=["pipeline", "merge", "decode"], help="run one part only")
    parser.add_argument("--skip-large", action="store_true", help="skip the checkpoint above half of RAM")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()), help="scratch space (default /tmp)"
    )
    parser.add_argument("--threads", type=int, default=1, help="decode threads for every engine (default 1)")
    parser.add_argument("--scale", action="store_true",
                        help="afterwards, the real-shape chain (bench.scale: 60M, 0.5B and 1.5B, ~12 min) and SFT at "
                        "0.5B (bench.sft_scale, ~10 min); their pages are added to the results page")  # fmt: skip
    args = parser.parse_args(argv)
    plan = {**(QUICK if args.quick else FULL), "threads": args.threads}
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    results: dict = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_average": {"start": list(os.getloadavg())},
        "skipped": [],
    }
    work = Path(tempfile.mkdtemp(prefix="ftd-bench-", dir=args.workdir))
    try:
        results["bandwidth"] = read_bandwidth(plan["bandwidth_bytes"], plan["threads"])
        log(f"read bandwidth {results['bandwidth']['gb_per_s']:.1f} GB/s ({results['bandwidth']['method']})")
        sections = results["section_seconds"] = {}

        def timed(section: str, fn, *fn_args):
            section_started = time.perf_counter()
            try:
                return fn(*fn_args)
            finally:
                sections[section] = round(time.perf_counter() - section_started, 1)

        if args.only in (None, "merge"):
            results["merge"] = timed("merge", bench_merge, work, plan, log)
            scaling, skipped = timed("merge scaling", bench_scaling, work, plan, results["machine"]["ram_bytes"],
                                     log, args.skip_large)  # fmt: skip
            results["scaling"], results["skipped"] = scaling, results["skipped"] + skipped
        if args.only in (None, "decode"):
            results["decode"] = [timed(f"decode {spec['name']}", bench_decode, work, spec, plan["threads"],
                                       plan["bandwidth_bytes"], log) for spec in plan["decode"]]  # fmt: skip
        if args.only in (None, "pipeline"):
            results["pipeline"] = timed("pipeline", bench_pipeline, work, args.quick, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"]["end"] = list(os.getloadavg())
    results["seconds"] = time.time() - started
    results["targets"] = targets(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "latest" if not args.quick else "quick"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    if args.scale:  # real model sizes: their own pages, generated now and added to this one
        from bench import scale, sft_scale

        scale.main([])
        sft_scale.main([])
        table += "\n" + "\n".join((RESULTS / page).read_text().replace("# ", "## ", 1)
                                   for page in ("scale.md", "sft-scale.md"))  # fmt: skip
    (RESULTS / f"{stem}.md").write_text("# ftd benchmarks\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
