"""One measured job per process (`python -m bench.child JOB ARGS_JSON RESULT_JSON`), so that peak RSS
and thread pools belong to that job alone.

Peak RSS is the process's own VmHWM (/proc/self/status), read at the end of the job: the high-water
mark of the memory map created at exec. (getrusage/wait4 `ru_maxrss` would not do: Linux folds the
forked parent's RSS into a child's maxrss at exec, so every child would report at least the parent.)"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    """Peak RSS of this process so far (MB): VmHWM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def merge_ours(args: dict) -> dict:
    import torch  # noqa: F401 (imported before the clock starts, as merge_peft's libraries are)

    from ftd.config import MergeSettings
    from tasks.merge import stream_merge

    baseline = _rss_mb()
    out = Path(args["out"])
    out.mkdir(parents=True)
    started = time.perf_counter()
    info = stream_merge(Path(args["base"]), Path(args["adapter"]), out, MergeSettings())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": baseline, "info": info}


def merge_peft(args: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    baseline = _rss_mb()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args["adapter"]).merge_and_unload()
    model.save_pretrained(args["out"], safe_serialization=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": baseline}


def _steady_rate(stamps: list[float]) -> float:
    """Tokens/s between the first and the last new token: decode steps only, prefill excluded."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _median_rate(once, args: dict) -> tuple[float, list[int]]:
    """Median steady rate of `passes` generations after a warm-up: a short decode is timed over a
    fraction of a second, where one scheduler hiccup moves a single pass by 10-20%."""
    import statistics

    once(8)  # warm-up
    rates = []
    for _ in range(args.get("passes", 1)):
        stamps, tokens = once(args["new_tokens"])
        rates.append(_steady_rate(stamps))
    return statistics.median(rates), tokens


def decode_hf(args: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps, self.tokens, self.prompt_seen = [], [], False

        def put(self, value):
            if not self.prompt_seen:  # generate() first streams the prompt
                self.prompt_seen = True
                return
            self.stamps.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    torch.set_num_threads(args["threads"])
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
    prompt = torch.tensor([args["prompt"]], dtype=torch.long)

    def once(n: int) -> tuple[list[float], list[int]]:
        streamer = Stamps()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=streamer, pad_token_id=3)  # fmt: skip
        return streamer.stamps, streamer.tokens

    rate, tokens = _median_rate(once, args)
    return {"tokens_per_s": rate, "tokens": tokens, "threads": torch.get_num_threads()}


def _og_generate(model_dir: str, adapter_file: str | None, prompt: list[int]):
    """A function that greedily generates n tokens with one og engine (its adapter active, if
    given) and returns each new token's timestamp and the tokens."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(og.Config(model_dir))  # genai_config.json's session_options set the threads (see run.py)
    adapters = None
    if adapter_file:
        adapters = og.Adapters(model)
        adapters.load(adapter_file, "bench")
    ids = np.asarray([prompt], dtype=np.int32)

    def once(n: int) -> tuple[list[float], list[int]]:
        params = og.GeneratorParams(model)
        total = ids.shape[1] + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "bench")
        generator.append_tokens(ids)
        stamps, tokens = [], []
        while len(tokens) < n and not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
            tokens.append(int(generator.get_next_tokens()[0]))
        return stamps, tokens

    return once


def decode_og(args: dict) -> dict:
    once = _og_generate(args["model"], args.get("adapter_file"), args["prompt"])
    rate, tokens = _median_rate(once, args)
    return {"tokens_per_s": rate, "tokens": tokens}


def decode_og_pair(args: dict) -> dict:
    """A multi-LoRA engine (adapter active) and the merged engine it is compared with, in one
    process, generations alternating (see `_alternating`)."""
    engines = {"merged": _og_generate(args["model"], None, args["prompt"]),
               "multi": _og_generate(args["multi_model"], args["adapter_file"], args["prompt"])}  # fmt: skip
    return _alternating(engines, args)


def _alternating(engines: dict, args: dict) -> dict:
    """Generations alternating (merged, multi; multi, merged; ...): each pass's ratio compares two
    generations a fraction of a second apart, so a slow phase of a shared machine hits both.
    Returns the median ratio of time per token (multi over merged), each's rate, the tokens and
    their agreement."""
    import statistics

    for once in engines.values():
        once(8)  # warm-up
    rates: dict[str, list[float]] = {"merged": [], "multi": []}
    tokens: dict[str, list[int]] = {}
    for i in range(args["passes"]):
        for name in ("merged", "multi") if i % 2 == 0 else ("multi", "merged"):
            stamps, tokens[name] = engines[name](args["new_tokens"])
            rates[name].append(_steady_rate(stamps))
    ratios = [merged / multi for merged, multi in zip(rates["merged"], rates["multi"], strict=True)]
    agreement = sum(a == b for a, b in zip(tokens["merged"], tokens["multi"])) / max(1, len(tokens["merged"]))
    return {"ms_per_token_ratio": statistics.median(ratios), "ratios": ratios, "agreement": agreement,
            "merged_tokens_per_s": statistics.median(rates["merged"]),
            "multi_tokens_per_s": statistics.median(rates["multi"]), "tokens": tokens}  # fmt: skip


def build_og(args: dict) -> dict:
    """The og model builder, in this process (so its peak RSS is this process's)."""
    import runpy

    sys.argv = ["builder", "-i", args["model"], "-o", args["out"], "-p", args["precision"], "-e", "cpu",
                "-c", args["cache"]]  # fmt: skip
    started = time.perf_counter()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _rss_mb()}


def _gguf_generate(model: str, threads: int, kv: str, prompt: list[int], lora: str | None = None):
    """n greedy tokens through ftd's llama.cpp runtime (LoadedGguf), each new token's timestamp."""
    from tasks.backends.llama_cpp.runtime import LoadedGguf

    loaded = LoadedGguf(Path(model), {"bench": Path(lora)} if lora else {}, n_ctx=256, n_threads=threads, kv_type=kv)
    adapter = "bench" if lora else None

    def once(n: int) -> tuple[list[float], list[int]]:
        stamps, tokens = [], []
        for token, _ in loaded.tokens(prompt, n, eos_ids=[], adapter=adapter):
            stamps.append(time.perf_counter())
            tokens.append(token)
        return stamps, tokens

    return once


def decode_gguf(args: dict) -> dict:
    once = _gguf_generate(args["model"], args["threads"], args["kv"], args["prompt"])
    rate, tokens = _median_rate(once, args)
    return {"tokens_per_s": rate, "tokens": tokens}


def decode_gguf_pair(args: dict) -> dict:
    """The merged GGUF and the base GGUF with the adapter's LoRA GGUF active, in one process,
    generations alternating (see `_alternating`)."""
    engines = {"merged": _gguf_generate(args["model"], args["threads"], "f32", args["prompt"]),
               "multi": _gguf_generate(args["base"], args["threads"], "f32", args["prompt"], args["lora"])}  # fmt: skip
    return _alternating(engines, args)


JOBS = {"merge-ours": merge_ours, "merge-peft": merge_peft, "decode-hf": decode_hf, "decode-og": decode_og,
        "decode-og-pair": decode_og_pair, "build-og": build_og, "decode-gguf": decode_gguf,
        "decode-gguf-pair": decode_gguf_pair}  # fmt: skip

if __name__ == "__main__":
    job, args_json, result_json = sys.argv[1:4]
    result = JOBS[job](json.loads(args_json))
    Path(result_json).write_text(json.dumps(result))
