"""Smoke test and parity gate: do the engines answer like the trained model?

Two stages. `reference_outputs` runs the eval prompts once per adapter through PyTorch: the
base model alone (accuracy before SFT), base + adapter (the trained model, unmerged) and the
merged model, keeping greedy tokens and per-step logits. `smoke_test` runs the same prompt ids
through one built engine and compares, pair by pair: greedy-token agreement, first differing
token, max |Δlogit| along the shared prefix, and eval accuracy. A missed threshold fails the
gate with a table naming the pair and the prompts that differ; nothing is then registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ftd.config import SmokeSettings, TargetConfig, Thresholds
from ftd.errors import GateFailed
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from tasks.backends.registry import get_backend
from tasks.backends.runtime import Generation
from tasks.base_model import model_dir
from tasks.data import load_split
from tasks.modeling import eos_token_ids, load_fp32_compute_model, load_tokenizer, stored_dtype
from tasks.sft import adapter_dir

REFERENCE, SMOKE = "reference", "smoke"
REFERENCE_MODELS = ("base", "adapter", "merged")


# ---------------------------------------------------------------- prompts and scoring


def smoke_prompts(data: Artifact, settings: SmokeSettings, store: Store) -> list[dict]:
    rows = load_split(data, store, "eval")[: settings.max_prompts]
    prompts = [{"messages": r["prompt"], "answer": r["answer"]} for r in rows]
    prompts += [{"messages": [{"role": "user", "content": p}], "answer": None} for p in settings.prompts]
    return prompts


def answer_text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@dataclass
class PairStats:
    agreement: float
    max_logit_diff: float | None
    differing: list[dict]


def compare(a: list[Generation], b: list[Generation]) -> PairStats:
    agree, worst, differing = 0, None, []
    for i, (x, y) in enumerate(zip(a, b)):
        first_diff = next((j for j, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t), None)
        if first_diff is None and len(x.tokens) != len(y.tokens):
            first_diff = min(len(x.tokens), len(y.tokens))
        diff = None
        if x.logits is not None and y.logits is not None:
            last = len(x.logits) if first_diff is None else first_diff + 1  # same prefix up to here
            steps = [np.abs(p - q).max() for p, q in zip(x.logits[:last], y.logits[:last])]
            diff = float(max(steps)) if steps else 0.0
            worst = diff if worst is None else max(worst, diff)
        if first_diff is None:
            agree += 1
        else:
            differing.append({"prompt": i, "first_differing_step": first_diff, "max_logit_diff": diff})
    return PairStats(agree / max(len(a), 1), worst, differing)


def accuracy(tokenizer, prompts: list[dict], outputs: list[Generation]) -> float | None:
    scored = [(p["answer"], o) for p, o in zip(prompts, outputs) if p["answer"] is not None]
    if not scored:
        return None
    return sum(answer_text(tokenizer, o.tokens) == expected.strip() for expected, o in scored) / len(scored)


# ---------------------------------------------------------------- reference (PyTorch)


def reference_device() -> str:
    """Where the PyTorch references run: the GPU when there is one (a 1B model's references on
    CPU take minutes), in fp32 with TF32 off, so they stay references for fp32 engines."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def reference_key(base: Artifact, adapter: Artifact, merged: Artifact, data: Artifact, settings: SmokeSettings) -> str:
    config = settings.model_dump(mode="json", exclude={"thresholds"})
    device = reference_device()
    if device != "cpu":  # logits differ in the last bits between devices; CPU keys stay as they were
        config["device"] = device
    return stage_key(
        REFERENCE,
        code=code_version(__file__),
        config=config,
        inputs=[base.key, adapter.key, merged.key, data.key],
        libraries=library_versions("torch", "transformers", "peft"),
    )


def reference_outputs(
    base: Artifact, adapter: Artifact, merged: Artifact, data: Artifact, settings: SmokeSettings, store: Store,
    trust_remote_code: bool = False,
) -> Artifact:  # fmt: skip
    """Greedy tokens and per-step logits of the base, base + adapter and merged models.

    Memory: one model in memory at a time, its weights in their stored dtype and its arithmetic in
    fp32 (`load_fp32_compute_model`: bitwise the fp32 model's logits, at half the memory for bf16),
    so a 7B bf16 model needs ~14 GB here, not 28. Time: prompts are decoded `settings.batch_size`
    at a time (left-padded), so the stage costs about (prompts / batch) × tokens forward passes."""

    def build(tmp: Path) -> dict:
        import gc
        import time

        import torch
        from peft import PeftModel

        device = reference_device()
        started = time.perf_counter()
        tokenizer = load_tokenizer(adapter_dir(adapter, store), trust_remote_code)
        eos = eos_token_ids(tokenizer, model_dir(base))
        prompts = smoke_prompts(data, settings, store)
        ids = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True) for p in prompts]
        outputs: dict[str, list[Generation]] = {}
        seconds: dict[str, float] = {}

        def decode(name: str, model) -> None:
            clock = time.perf_counter()
            outputs[name] = torch_greedy_batch(model, ids, settings.max_new_tokens, eos, tokenizer, settings.batch_size)
            seconds[name] = round(time.perf_counter() - clock, 3)

        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references: TF32 rounds inputs to 10 bits
        try:
            model = load_fp32_compute_model(model_dir(base), trust_remote_code).to(device).eval()
            if settings.include_base:
                decode("base", model)
            model = PeftModel.from_pretrained(model, adapter_dir(adapter, store)).to(device).eval()
            decode("adapter", model)
            del model
            gc.collect()  # the base's weights are gone before the merged model's are read
            model = load_fp32_compute_model(merged.path(store), trust_remote_code).to(device).eval()
            decode("merged", model)
            del model
            gc.collect()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        save_generations(tmp, outputs)
        (tmp / "prompts.json").write_text(json.dumps({"prompts": prompts, "ids": ids, "eos": eos}))
        meta = {name: {"accuracy": accuracy(tokenizer, prompts, outs)} for name, outs in outputs.items()}
        return meta | {"device": device, "seconds": round(time.perf_counter() - started, 3), "decode_seconds": seconds,
                       "weights_dtype": stored_dtype(merged.path(store)), "compute_dtype": "float32"}  # fmt: skip

    key = reference_key(base, adapter, merged, data, settings)
    return store.materialize(REFERENCE, key, build, lineage={"adapter": adapter.key, "merged": merged.key})


def torch_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], tokenizer) -> Generation:
    return torch_greedy_batch(model, [prompt_ids], max_new_tokens, eos_ids, tokenizer, 1)[0]


def torch_greedy_batch(
    model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], tokenizer, batch_size: int
) -> list[Generation]:
    """Greedy decoding of many prompts, `batch_size` at a time, left-padded (prompts sorted by
    length so a batch pads little). Each answer ends at its first stop token, as it would alone;
    padding changes an fp32 logit by rounding only (~1e-6)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, Generation] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        for row, i in enumerate(batch):
            tokens = out.sequences[row, width:].tolist()
            stop = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
            tokens = tokens if stop is None else tokens[: stop + 1]
            logits = [step[row].float().cpu().numpy() for step in out.logits[: len(tokens)]]
            results[i] = Generation(tokens=tokens, logits=logits)
    return [results[i] for i in range(len(prompts))]


def save_generations(directory: Path, outputs: dict[str, list[Generation]]) -> None:
    arrays, tokens = {}, {}
    for name, gens in outputs.items():
        tokens[name] = [g.tokens for g in gens]
        for i, g in enumerate(gens):
            if g.logits:
                arrays[f"{name}/{i}"] = np.stack(g.logits)
    np.savez_compressed(directory / "logits.npz", **arrays)
    (directory / "tokens.json").write_text(json.dumps(tokens))


def load_generations(directory: Path) -> dict[str, list[Generation]]:
    tokens = json.loads((directory / "tokens.json").read_text())
    with np.load(directory / "logits.npz") as arrays:
        return {
            name: [
                Generation(seq, list(arrays[f"{name}/{i}"]) if f"{name}/{i}" in arrays else None)
                for i, seq in enumerate(seqs)
            ]
            for name, seqs in tokens.items()
        }


# ---------------------------------------------------------------- engine smoke test and gate


def smoke_key(reference: Artifact, engine: Artifact, target: TargetConfig, settings: SmokeSettings) -> str:
    return stage_key(
        SMOKE,
        code=code_version(__file__),
        config={
            "thresholds": thresholds_for(target, settings),
            "target": target.model_dump(mode="json", exclude={"name"}),
        },
        inputs=[reference.key, engine.key],
        libraries=library_versions(*get_backend(target.backend).libraries),
    )


def smoke_test(
    reference: Artifact, engine: Artifact, adapter: Artifact, target: TargetConfig, settings: SmokeSettings,
    store: Store,
) -> Artifact:  # fmt: skip

    def build(tmp: Path) -> dict:
        ref_dir = reference.path(store)
        info = json.loads((ref_dir / "prompts.json").read_text())
        generations = load_generations(ref_dir)
        run_all = open_engine(target, engine.path(store), adapter.meta["adapter_name"])
        generations["engine"] = run_all(info["ids"], settings.max_new_tokens, info["eos"])
        tokenizer = load_tokenizer(adapter_dir(adapter, store))
        report = build_report(tokenizer, info["prompts"], generations, thresholds_for(target, settings), target.name)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        # the engine's greedy tokens per prompt: what a served version must answer (tests/test_serving.py)
        (tmp / "engine_tokens.json").write_text(json.dumps([g.tokens for g in generations["engine"]]))
        (tmp / "report.md").write_text(report_markdown(report))
        if report["failures"]:
            raise GateFailed(f"parity gate failed for target {target.name}: " + "; ".join(report["failures"]), report)
        return {"metrics": report["metrics"], "target": target.name, "passed": True}

    key = smoke_key(reference, engine, target, settings)
    return store.materialize(SMOKE, key, build, lineage={"reference": reference.key, "engine": engine.key})


PAIRS = (("adapter", "merged"), ("merged", "engine"), ("adapter", "engine"))


def thresholds_for(target: TargetConfig, settings: SmokeSettings) -> Thresholds:
    return target.thresholds or settings.thresholds


def open_engine(target: TargetConfig, engine_dir: Path, adapter_name: str):
    """`run_all(prompts, max_new_tokens, eos_ids) -> [Generation]` for this engine (a bundle of
    several adapters with `adapter_name` active). Engines that run out of process decode all
    prompts in one call (`greedy_batch`), the others prompt by prompt."""
    engine = get_backend(target.backend).open(engine_dir, target, adapter_name)
    if hasattr(engine, "greedy_batch"):
        return engine.greedy_batch
    return lambda prompts, n, eos: [engine.greedy(ids, n, eos) for ids in prompts]


def build_report(tokenizer, prompts: list[dict], gens: dict[str, list[Generation]], t: Thresholds, target: str) -> dict:
    metrics: dict[str, float | None] = {}
    for name, outs in gens.items():
        metrics[f"accuracy.{name}"] = accuracy(tokenizer, prompts, outs)
    pairs, failures, adapter_failures = {}, [], []
    for a, b in PAIRS:
        stats = compare(gens[a], gens[b])
        label = f"{a}_vs_{b}"
        pairs[label] = {
            "agreement": stats.agreement,
            "max_logit_diff": stats.max_logit_diff,
            "differing": stats.differing,
        }
        metrics[f"agreement.{label}"] = stats.agreement
        metrics[f"max_logit_diff.{label}"] = stats.max_logit_diff
        found = []
        if stats.agreement < t.min_agreement:
            shown = ", ".join(f"#{d['prompt']}@{d['first_differing_step']}" for d in stats.differing[:8])
            found.append(f"{label} greedy agreement {stats.agreement:.3f} < {t.min_agreement} (prompts: {shown})")
        if stats.max_logit_diff is not None and stats.max_logit_diff > t.max_logit_diff:
            found.append(f"{label} max |Δlogit| {stats.max_logit_diff:.2e} > {t.max_logit_diff:.0e}")
        failures += found
        if "engine" not in (a, b):
            adapter_failures += found
    for name in ("adapter", "engine"):
        acc = metrics[f"accuracy.{name}"]
        if acc is not None and acc < t.min_accuracy:
            failures.append(f"{name} eval accuracy {acc:.3f} < {t.min_accuracy}")
            if name == "adapter":
                adapter_failures.append(failures[-1])
    rows = []
    for i, p in enumerate(prompts):
        rows.append({
            "prompt": p["messages"][-1]["content"],
            "expected": p["answer"],
            **{name: answer_text(tokenizer, gens[name][i].tokens) for name in gens},
        })  # fmt: skip
    # adapter_failures: those of the PyTorch models alone (the trained adapter or its merge), which
    # no engine can pass; the others are this engine's own
    return {"target": target, "metrics": metrics, "pairs": pairs, "rows": rows, "failures": failures,
            "adapter_failures": adapter_failures, "thresholds": t.model_dump()}  # fmt: skip


def report_markdown(report: dict) -> str:
    m = report["metrics"]
    lines = [f"## Smoke test: {report['target']}", "", "| pair | greedy agreement | max abs logit diff | differing prompts |",
             "|---|---|---|---|"]  # fmt: skip
    for label, p in report["pairs"].items():
        diff = "n/a" if p["max_logit_diff"] is None else f"{p['max_logit_diff']:.2e}"
        differing = ", ".join(str(d["prompt"]) for d in p["differing"][:10]) or "-"
        lines.append(f"| {label} | {p['agreement']:.3f} | {diff} | {differing} |")
    lines += ["", "| model | eval accuracy |", "|---|---|"]
    for key, value in m.items():
        if key.startswith("accuracy.") and value is not None:
            lines.append(f"| {key.removeprefix('accuracy.')} | {value:.3f} |")
    lines += ["", "**Gate: " + ("FAILED** — " + "; ".join(report["failures"]) if report["failures"] else "passed**")]
    return "\n".join(lines) + "\n"
