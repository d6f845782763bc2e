"""The CUDA paths of ftd, checked on a real NVIDIA GPU (run through scripts/gpu_check.sh).

What the CPU-only suite cannot see: that SFT really trains on the GPU (bf16 with gradient
checkpointing, ftd's GPU defaults, and fp32), that the loss falls, that the streaming merge of a
bf16 checkpoint agrees with peft's own merge, that the reference stage runs on CUDA, that CUDA
targets are skipped only for what is really missing, and what ftd's training costs against a plain
TRL script with the same settings. It calls ftd's stage functions directly (no Prefect, no
MLflow: neither is needed to train, merge or compute references) on a Llama-3.2-1B-shaped
synthetic model (random bf16 weights, real config) with the default experiment's data.

    python scripts/gpu_check.py --out DIR            # on a GPU machine; exit 1 if a check fails
    python scripts/gpu_check.py --out DIR --tiny     # a 2-layer model on any machine (tests the script)

Writes DIR/gpu_check.json (every figure) and DIR/gpu_check.md (the table for docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import synth  # noqa: E402
from ftd.builtin_models import BUILTINS, train_tokenizer  # noqa: E402
from ftd.config import AdapterConfig, TargetConfig, load_config  # noqa: E402
from ftd.store import Store  # noqa: E402
from tasks.backends.registry import get_backend  # noqa: E402
from tasks.base_model import parse_base, resolve_base  # noqa: E402
from tasks.data import load_split, prepare_data  # noqa: E402
from tasks.merge import merge_adapter  # noqa: E402
from tasks.sft import STEP_SECONDS, adapter_dir, train_adapter  # noqa: E402
from tasks.smoke import reference_outputs  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "tiny-llama.yaml"
CUDA_TARGETS = [
    TargetConfig(name="onnx-cuda-fp16", backend="onnx_genai", precision="fp16", device="cuda"),
    TargetConfig(name="onnx-cuda-int4", backend="onnx_genai", precision="int4", device="cuda"),
    TargetConfig(name="trtllm-fp16", backend="tensorrt_llm", precision="fp16", device="cuda"),
    TargetConfig(name="dashinfer-lora", backend="dashinfer", mode="multi_lora", precision="bf16", device="cuda"),
]


@dataclass
class Checks:
    rows: list[dict] = field(default_factory=list)

    def add(self, name: str, ok: bool | None, detail: str) -> None:
        """ok None: not applicable on this machine (the --tiny run on a CPU), never a pass."""
        self.rows.append({"check": name, "result": {True: "pass", False: "FAIL", None: "n/a"}[ok], "detail": detail})
        print(f"[{self.rows[-1]['result']}] {name}: {detail}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if r["result"] == "FAIL"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="scratch (models, store; GBs): default OUT/work")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, not the GPU")
    parser.add_argument("--steps", type=int, default=None, help="SFT steps per run (default 60; --tiny 20)")
    args = parser.parse_args(argv)
    import torch

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    steps = args.steps or (20 if args.tiny else 60)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    results: dict = {"machine": machine_facts(), "model": {}, "sft": {}, "plain_trl": {}}
    if not on_gpu and not args.tiny:
        checks.add("GPU visible", False, "torch.cuda.is_available() is False: run with --tiny to test the script only")
        return finish(out, results, checks, started)
    checks.add("GPU visible", True if on_gpu else None, results["machine"]["gpu"] or "no GPU (--tiny on CPU)")

    # ---------------------------------------------------------------- model, store, data
    work = (args.work or out / "work").resolve()
    model_dir = work / ("tiny-llama-shape" if args.tiny else "llama-3.2-1b-shape")
    t = time.perf_counter()
    config = synth.llama_config(64, 128, 2, 512, 4, 2) if args.tiny else synth.llama_3_2_1b_config()
    written = synth.write_checkpoint(model_dir, config, 1 << 30, dtype="bfloat16")
    train_tokenizer(BUILTINS["tiny-llama"]).save_pretrained(model_dir)  # the project's own tokenizer and template
    results["model"] = {"shape": "tiny" if args.tiny else "Llama-3.2-1B", **written,
                        "write_seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    store = Store(work)
    cfg = load_config(DEFAULT_CONFIG, [f"base_model={model_dir}", f"artifacts_dir={work}"])
    base = resolve_base(parse_base(str(model_dir)), store)
    adapter_cfg = cfg.adapters[0]
    data = prepare_data(adapter_cfg.data, store, base, adapter_cfg.sft.max_length)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in load_split(data, store, "train")]

    # ---------------------------------------------------------------- SFT: ftd and plain TRL, bf16 and fp32
    trained = {}
    # CUDA's first training in a process loads and autotunes kernels (the first GPU run here: plain
    # TRL's whole-run tokens/s 0.70x of ftd's, its median step 1.07x): an untimed warm-up pays it.
    warm = adapter_cfg.model_copy(
        update={"sft": adapter_cfg.sft.model_copy(update={"max_steps": 5, "dtype": "bfloat16"})}
    )
    plain_trl(model_dir, rows, warm, work / "warm-up")
    for dtype in ("bfloat16", "float32"):
        one = adapter_cfg.model_copy(
            update={"sft": adapter_cfg.sft.model_copy(update={"max_steps": steps, "dtype": dtype})}
        )
        first_plain = dtype == "bfloat16"  # which side runs first alternates: the first run pays CUDA's warm-up
        if first_plain:
            results["plain_trl"][dtype] = plain_trl(model_dir, rows, one, work / f"plain-{dtype}")
        adapter = train_adapter(base, data, one, store)
        if not first_plain:
            results["plain_trl"][dtype] = plain_trl(model_dir, rows, one, work / f"plain-{dtype}")
        trained[dtype] = adapter
        meta = adapter.meta
        step_seconds = json.loads((adapter.path(store) / STEP_SECONDS).read_text())
        results["sft"][dtype] = {k: meta.get(k) for k in (
            "device", "dtype", "gradient_checkpointing", "gpu", "gpu_peak_memory_bytes", "steps", "train_seconds",
            "tokens_seen", "tokens_per_second", "train_loss")} | {"median_step_seconds": steady_median(step_seconds),
            "first_loss": meta["loss_curve"][0]["loss"], "last_loss": meta["loss_curve"][-1]["loss"]}  # fmt: skip
        sft, plain = results["sft"][dtype], results["plain_trl"][dtype]
        if on_gpu:
            used = sft["device"].startswith("cuda") and (sft["gpu_peak_memory_bytes"] or 0) > written["bytes"] // 2
            checks.add(f"SFT {dtype} on the GPU", used,
                       f"weights on {sft['device']} ({sft['dtype']}), peak GPU memory {gib(sft['gpu_peak_memory_bytes'])}")  # fmt: skip
            expected_gc = True  # ftd's GPU default
            checks.add(f"SFT {dtype} gradient checkpointing (GPU default)", sft["gradient_checkpointing"] == expected_gc,
                       str(sft["gradient_checkpointing"]))  # fmt: skip
        else:
            checks.add(f"SFT {dtype} on the GPU", None, f"trained on {sft['device']}")
        checks.add(f"SFT {dtype} loss falls", sft["last_loss"] < 0.95 * sft["first_loss"],
                   f"{sft['first_loss']:.3f} → {sft['last_loss']:.3f} over {sft['steps']} steps")  # fmt: skip
        ratio = sft["tokens_per_second"] / plain["tokens_per_second"]
        step_ratio = plain["median_step_seconds"] / sft["median_step_seconds"]
        results["sft"][dtype] |= {
            "tokens_per_second_vs_plain": round(ratio, 3),
            "step_speed_vs_plain": round(step_ratio, 3),
        }
        # The check is on the median step (robust to a slow spell); whole-run tokens/s is reported too.
        checks.add(f"SFT {dtype} step speed vs plain TRL", step_ratio >= 0.9 if on_gpu else None,
                   f"median step {step_ratio:.3f}x ({1000 * sft['median_step_seconds']:.1f} vs "
                   f"{1000 * plain['median_step_seconds']:.1f} ms); whole run {ratio:.3f}x "
                   f"({sft['tokens_per_second']:.0f} vs {plain['tokens_per_second']:.0f} tokens/s)")  # fmt: skip

    # ---------------------------------------------------------------- merge of the bf16 checkpoint vs peft
    adapter = trained["bfloat16"]
    t = time.perf_counter()
    merged = merge_adapter(base, adapter, cfg.merge, store)
    results["merge"] = {"seconds": round(time.perf_counter() - t, 2), **merged.meta}
    for device in ("cpu", "cuda") if on_gpu else ("cpu",):
        stats = compare_with_peft(model_dir, adapter_dir(adapter, store), merged.path(store), device)
        results["merge"][f"vs_peft_{device}"] = stats
        bound = 0 if device == "cpu" else 2  # peft upcasts on CPU (bitwise equal); on CUDA it adds in bf16
        checks.add(f"bf16 merge vs peft merge_and_unload on {device}", stats["max_ulps"] <= bound,
                   f"{stats['tensors']} tensors, {100 * stats['equal_fraction']:.4f}% bitwise equal, "
                   f"max {stats['max_ulps']} bf16 ulp (bound {bound}), max |Δ| {stats['max_abs_diff']:.2e}")  # fmt: skip

    # ---------------------------------------------------------------- reference stage
    smoke = cfg.smoke.model_copy(update={"max_prompts": 16})
    t = time.perf_counter()
    reference = reference_outputs(base, adapter, merged, data, smoke, store)
    results["reference"] = {"seconds": round(time.perf_counter() - t, 2), "prompts": 16,
                            "max_new_tokens": smoke.max_new_tokens, **reference.meta}  # fmt: skip
    checks.add("reference stage on CUDA", reference.meta["device"] == "cuda" if on_gpu else None,
               f"ran on {reference.meta['device']} in {results['reference']['seconds']} s "
               f"(3 models x 16 prompts x {smoke.max_new_tokens} tokens)")  # fmt: skip
    agreement = reference_agreement(reference.path(store))
    results["reference"]["adapter_vs_merged"] = agreement
    checks.add("reference: adapter and merged model agree", agreement["agreement"] >= 0.95,
               f"greedy agreement {agreement['agreement']:.3f}, max |Δlogit| {agreement['max_logit_diff']:.2e} "
               "(bf16-merged weights vs bf16 base + fp32 adapter, both run in fp32)")  # fmt: skip

    # ---------------------------------------------------------------- CUDA targets: skipped only for what is missing
    results["cuda_targets"] = {}
    for target in CUDA_TARGETS:
        reason = get_backend(target.backend).unavailable_reason(target)
        results["cuda_targets"][target.name] = reason or "runs here"
        blames_gpu = reason is not None and "GPU is present" not in reason and "package is not installed" not in reason
        checks.add(f"CUDA target {target.name}: skip reason", not blames_gpu if on_gpu else None,
                   reason or "not skipped: its packages and a GPU are present")  # fmt: skip
    return finish(out, results, checks, started)


def plain_trl(model_dir: Path, rows: list[dict], adapter: AdapterConfig, out: Path) -> dict:
    """The same training as ftd's SFT stage, written as a user would by hand: the same model
    dtype, SFTConfig, LoraConfig and rows; no store, no callbacks beyond a clock read per step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    s, lora = adapter.sft, adapter.lora
    dtype = getattr(torch, s.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    args = SFTConfig(
        output_dir=str(out), max_steps=s.max_steps, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum, max_length=s.max_length,
        packing=s.packing, warmup_steps=s.warmup_steps, lr_scheduler_type=s.scheduler, weight_decay=s.weight_decay,
        logging_steps=s.logging_steps, seed=s.seed, data_seed=s.seed, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )  # fmt: skip
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), use_rslora=lora.rslora, task_type="CAUSAL_LM")  # fmt: skip
    set_seed(s.seed)
    times = StepTimes()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[times])  # fmt: skip
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"train_seconds": round(seconds, 3), "tokens_seen": tokens, "tokens_per_second": round(tokens / seconds, 1),
            "median_step_seconds": steady_median(times.seconds)}  # fmt: skip


def steady_median(step_seconds: list[float]) -> float:
    """The median step time after the first 3 (CUDA kernels load and autotune there)."""
    return round(statistics.median(step_seconds[3:] or step_seconds), 6)


def compare_with_peft(model_dir: Path, adapter_path: Path, merged_dir: Path, device: str) -> dict:
    """peft's own merge (`merge_and_unload`) of the same bf16 base on `device`, tensor by tensor
    against ftd's streaming merge: how many elements are bitwise equal, the largest difference
    in units of the bf16 spacing at that value (ulp) and in absolute terms."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    theirs = PeftModel.from_pretrained(model, adapter_path).merge_and_unload().state_dict()
    tensors, equal, total, max_ulps, max_abs = 0, 0, 0, 0, 0.0
    for shard in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name not in theirs:
                    continue
                ours, peft_w = f.get_tensor(name).to(device), theirs[name]
                diff = (ours.float() - peft_w.float()).abs()
                spacing = torch.maximum(ours.float().abs(), peft_w.float().abs())
                # bf16 has 8 significant bits: the spacing at x is 2^(floor(log2|x|) - 7)
                ulp = torch.exp2(torch.floor(torch.log2(spacing.clamp_min(torch.finfo(torch.bfloat16).tiny))) - 7)
                tensors += 1
                equal += int((ours.view(torch.int16) == peft_w.view(torch.int16)).sum())
                total += ours.numel()
                max_ulps = max(max_ulps, int(torch.ceil((diff / ulp).max())))
                max_abs = max(max_abs, float(diff.max()))
    del theirs, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tensors": tensors, "equal_fraction": equal / max(total, 1), "max_ulps": max_ulps, "max_abs_diff": max_abs}


def reference_agreement(reference_dir: Path) -> dict:
    from tasks.smoke import compare, load_generations

    gens = load_generations(reference_dir)
    stats = compare(gens["adapter"], gens["merged"])
    return {"agreement": stats.agreement, "max_logit_diff": stats.max_logit_diff or 0.0}


def machine_facts() -> dict:
    import importlib.metadata as md

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    memory = torch.cuda.get_device_properties(0).total_memory if gpu else None
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"gpu": gpu, "gpu_memory": gib(memory), "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "versions": versions}  # fmt: skip


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def finish(out: Path, results: dict, checks: Checks, started: float) -> int:
    results["checks"] = checks.rows
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    print(f"gpu check: {len(checks.rows) - len(checks.failed)} of {len(checks.rows)} checks not failed "
          f"in {results['seconds']} s; failed: {', '.join(checks.failed) or 'none'}")  # fmt: skip
    return 1 if checks.failed else 0


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"GPU: {m['gpu'] or 'none'} ({m['gpu_memory']}), CUDA {m['cuda']}, Python {m['python']}, "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; {m['date']}, {results['seconds']} s.",
             "", "| check | result | detail |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['check']} | {r['result']} | {r['detail']} |" for r in results["checks"]]
    if results.get("sft"):
        lines += ["", "| SFT | ftd tokens/s | plain TRL tokens/s | ratio | median step ftd / plain (ms) | "
                  "peak GPU memory | train s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for dtype, s in results["sft"].items():
            p = results["plain_trl"][dtype]
            lines.append(f"| {dtype} | {s['tokens_per_second']:.0f} | {p['tokens_per_second']:.0f} | "
                         f"{s['tokens_per_second_vs_plain']:.3f}x | {1000 * s['median_step_seconds']:.1f} / "
                         f"{1000 * p['median_step_seconds']:.1f} | {gib(s['gpu_peak_memory_bytes'])} | "
                         f"{s['train_seconds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
