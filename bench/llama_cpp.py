"""llama.cpp against the other CPU engines on one random Llama, side by side in one run.

- Decode at batch 1 (tokens/s, and as a fraction of the read-bandwidth bound): transformers,
  og fp32, og int4, llama.cpp f32, q8_0, q4_0 and q4_k_m, each in its own process, the order
  rotated per round; the bandwidth is measured before every round.
- llama.cpp multi-LoRA (base GGUF + the adapter's LoRA GGUF, active) against the merged GGUF:
  both in one process, generations alternating, the ratio of time per token per pass.
- Building: GGUF conversion (+ quantisation) against the og builder, time and peak RSS, each in
  its own process.

Every engine decodes through the code ftd ships (`LoadedGguf`, og's Generator). Run with
`python -m bench.run --only llama_cpp` (or as part of the full run)."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from bench import synth
from bench.stats import stats

GB = 1e9
LARGE = {"name": "large", "hidden": 2048, "intermediate": 5632, "layers": 12, "vocab": 32000, "heads": 16,
         "new_tokens": 32, "pair_passes": 6, "repeats": 3}  # fmt: skip
QUICK = {"name": "quick", "hidden": 256, "intermediate": 768, "layers": 2, "vocab": 4000, "heads": 4,
         "new_tokens": 16, "pair_passes": 2, "repeats": 2}  # fmt: skip
GGUF_TYPES = ("f32", "q8_0", "q4_0", "q4_k_m")
TARGETS = {"q4_0_fraction_of_bound": 0.8, "q4_0_over_og_int4": 1.5, "multi_lora_over_merged_ms_per_token": 1.10}


def _gguf(work: Path, hf_dir: Path, kind: str, sources: dict) -> tuple[Path, dict]:
    """`kind` as a GGUF, made as ftd makes it: converted directly, or quantised from the f32 one."""
    from tasks.backends.llama_cpp import convert
    from tasks.backends.llama_cpp.options import QUANTIZED

    out = work / f"{hf_dir.name}-{kind}.gguf"
    if kind in QUANTIZED:
        spec = {"source": str(sources["f32"]), "out": str(out), "ftype": QUANTIZED[kind]}
        return out, convert.run_worker("quantize", spec, work / "build.log", f"quantise {kind}")
    spec = {"model_dir": str(hf_dir), "out": str(out), "outtype": kind, "pre_tokenizer": "gpt-2"}
    return out, convert.run_worker("convert-hf", spec, work / "build.log", f"convert {kind}")


def bench_llama_cpp(work: Path, spec: dict, threads: int, bandwidth_bytes: int, log) -> dict:
    from bench.run import decode_model_record, graph_weight_bytes, read_bandwidth, run_child, set_threads
    from ftd.config import MergeSettings
    from tasks.backends.llama_cpp import convert
    from tasks.backends.llama_cpp.options import QUANTIZED
    from tasks.merge import stream_merge

    work = work / f"llama-cpp-{spec['name']}"
    config = synth.llama_config(spec["hidden"], spec["intermediate"], spec["layers"], spec["vocab"], spec["heads"])
    base, merged, adapter = work / "base", work / "merged", work / "adapter"
    info = synth.write_decode_model(base, config)
    synth.write_adapter(adapter, config, std=0.05)
    merged.mkdir()
    stream_merge(base, adapter, merged, MergeSettings())

    # ---- builds: og's builder vs GGUF conversion (+ quantisation), time and peak RSS, own processes
    builds, paths, weight_bytes = {}, {}, {}
    for precision in ("fp32", "int4"):
        result, wall = run_child("build-og", {"model": str(merged), "out": str(work / f"og-{precision}"),
                                              "precision": precision, "cache": str(work / ".og-cache")}, work)  # fmt: skip
        builds[f"og {precision}"] = {"seconds": round(wall, 1), "peak_rss_mb": round(result["peak_rss_mb"])}
        paths[f"og {precision}"] = work / f"og-{precision}"
        set_threads(work / f"og-{precision}" / "genai_config.json", threads)
        weight_bytes[f"og {precision}"] = graph_weight_bytes(work / f"og-{precision}" / "model.onnx")["read_bytes"]
    for kind in GGUF_TYPES:
        started = time.perf_counter()
        path, result = _gguf(work, merged, kind, {k.split()[-1]: p for k, p in paths.items() if k.startswith("gguf")})
        seconds, rss = time.perf_counter() - started, result["peak_rss_mb"]
        if kind in QUANTIZED:  # conversion + quantisation, as a quantised target costs from scratch
            seconds, rss = seconds + builds["gguf f32"]["seconds"], max(rss, builds["gguf f32"]["peak_rss_mb"])
        builds[f"gguf {kind}"] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss),
                                  "tensor_types": result["tensor_types"]}  # fmt: skip
        paths[f"gguf {kind}"], weight_bytes[f"gguf {kind}"] = path, result["read_bytes_per_token"]
    base_gguf, _ = _gguf(work, base, "f32", {})
    lora = work / "adapter.gguf"
    with_folded = work / "folded"
    convert.fold_adapter("bench", adapter, with_folded)
    lora_result = convert.run_worker("convert-lora", {"base_dir": str(base), "adapter_dir": str(with_folded),
                                                      "out": str(lora), "outtype": "f32"}, work / "build.log",
                                     "convert the adapter")  # fmt: skip
    weight_bytes["transformers"] = sum(
        math.prod(s) * 4 for n, s in synth.shapes_of(config).items() if "embed_tokens" not in n
    )
    log(f"llama.cpp {spec['name']}: built " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in builds.items()))

    # ---- decode, one process per engine, the order rotated per round
    prompt = random.Random(0).sample(range(10, 500), 16)
    common = {"prompt": prompt, "new_tokens": spec["new_tokens"], "passes": 1, "threads": threads}
    jobs = {"transformers": ("decode-hf", {"model": str(merged), **common})}
    jobs |= {name: ("decode-og", {"model": str(paths[name]), **common}) for name in ("og fp32", "og int4")}
    jobs |= {f"gguf {k}": ("decode-gguf", {"model": str(paths[f"gguf {k}"]), "kv": "f32" if k == "f32" else "f16",
                                           **common}) for k in GGUF_TYPES}  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in jobs}
    bandwidths, pair = [], []
    names = list(jobs)
    for round_ in range(spec["repeats"]):
        bandwidths.append(read_bandwidth(bandwidth_bytes, threads, repeats=3)["gb_per_s"] * GB)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            job, args = jobs[name]
            result, _ = run_child(job, args, work, threads)
            runs[name].append(result["tokens_per_s"])
        result, _ = run_child("decode-gguf-pair", {"model": str(paths["gguf f32"]), "base": str(base_gguf),
                                                   "lora": str(lora), **common, "passes": spec["pair_passes"]},
                              work, threads)  # fmt: skip
        pair.append(result)
        log(f"llama.cpp {spec['name']} round {round_ + 1} ({bandwidths[-1] / GB:.1f} GB/s): "
            + ", ".join(f"{n} {runs[n][-1]:.1f}" for n in names) + f" tok/s; multi-LoRA / merged "
            f"{result['ms_per_token_ratio']:.3f}× time/token")  # fmt: skip
    engines = {
        name: {"tokens_per_s": stats(runs[name]), "weight_bytes_per_token": weight_bytes[name],
               "fraction_of_bound": stats([r * weight_bytes[name] / b for r, b in zip(runs[name], bandwidths)])}
        for name in names
    }  # fmt: skip

    def per_round(a: str, b: str) -> dict:
        return stats([x / y for x, y in zip(runs[a], runs[b])])

    shutil.rmtree(work, ignore_errors=True)
    return {
        "name": spec["name"],
        "model": decode_model_record(spec, info, prompt),
        "threads": threads,
        "repeats": spec["repeats"],
        "bandwidth_gb_per_s": stats([b / GB for b in bandwidths]),
        "builds": builds,
        "lora_gguf": {"bytes": lora.stat().st_size if lora.exists() else None, "seconds": lora_result["seconds"]},
        "engines": engines,
        "ratio": {
            "q4_0_over_og_int4": per_round("gguf q4_0", "og int4"),
            "q4_k_m_over_og_int4": per_round("gguf q4_k_m", "og int4"),
            "f32_over_og_fp32": per_round("gguf f32", "og fp32"),
            "f32_over_transformers": per_round("gguf f32", "transformers"),
            "multi_lora_over_merged_ms_per_token": stats([p["ms_per_token_ratio"] for p in pair]),
        },
        "greedy_token_agreement_multi_lora_vs_merged": stats([p["agreement"] for p in pair]),
    }


def targets(result: dict) -> list[dict]:
    e, r = result["engines"], result["ratio"]
    return [
        {"name": "llama.cpp q4_0 decode, fraction of the read-bandwidth bound", "value": e["gguf q4_0"]["fraction_of_bound"]["median"],
         "target": f">= {TARGETS['q4_0_fraction_of_bound']}", "met": e["gguf q4_0"]["fraction_of_bound"]["median"] >= TARGETS["q4_0_fraction_of_bound"]},
        {"name": "llama.cpp q4_0 / og int4 tokens/s", "value": r["q4_0_over_og_int4"]["median"],
         "target": f">= {TARGETS['q4_0_over_og_int4']}", "met": r["q4_0_over_og_int4"]["median"] >= TARGETS["q4_0_over_og_int4"]},
        {"name": "llama.cpp multi-LoRA (adapter active) / merged GGUF, time per token",
         "value": r["multi_lora_over_merged_ms_per_token"]["median"],
         "target": f"<= {TARGETS['multi_lora_over_merged_ms_per_token']}",
         "met": r["multi_lora_over_merged_ms_per_token"]["median"] <= TARGETS["multi_lora_over_merged_ms_per_token"]},
    ]  # fmt: skip


def markdown(result: dict) -> list[str]:
    from bench.stats import fmt

    m = result["model"]
    lines = [f"### llama.cpp against the other CPU engines ({m['parameters'] / 1e6:.0f}M-parameter Llama, "
             f"{result['threads']} thread(s), batch 1, {m['new_tokens']} new tokens, {result['repeats']} rounds; "
             f"read bandwidth {fmt(result['bandwidth_gb_per_s'])} GB/s)", "",
             "| engine | tokens/s | weight MB read per token | fraction of the bound |", "|---|---|---|---|"]  # fmt: skip
    for name, e in result["engines"].items():
        lines.append(f"| {name} | {fmt(e['tokens_per_s'])} | {e['weight_bytes_per_token'] / 1e6:.0f} | "
                     f"{fmt(e['fraction_of_bound'], 2)} |")  # fmt: skip
    lines += ["", "| ratio (per round) | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, 3)} |" for k, v in result["ratio"].items()]
    lines += [
        "",
        "| build (quantised GGUFs: conversion to f32 + quantisation) | seconds | peak RSS (MB) |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['seconds']} | {v['peak_rss_mb']} |" for k, v in result["builds"].items()]
    lines += ["", "| target | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
              for t in targets(result)]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from bench.run import RESULTS, read_bandwidth

    parser = argparse.ArgumentParser(prog="python -m bench.llama_cpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model: a check of the harness (~1 min)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ftd-bench-llama-cpp-"))
    try:
        bandwidth_bytes = 2**28 if args.quick else 2**30
        read_bandwidth(bandwidth_bytes, args.threads, repeats=1)
        result = bench_llama_cpp(work, QUICK if args.quick else LARGE, args.threads, bandwidth_bytes, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - started)
    result["targets"] = targets(result)
    stem = "llama-cpp-quick" if args.quick else "llama-cpp"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(markdown(result)) + "\n"
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
