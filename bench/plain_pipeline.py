"""The baseline ftd is measured against: the default experiment's steps as one plain script that calls
trl, peft, transformers and onnxruntime-genai directly, the way users glue them together by hand.

Same data, settings and seed as the config's first adapter and target; no cache, no tracking, no
orchestration. It does the same work as `ftd run` (train, merge, build, then check that the
trained model, the merged model and the engine agree on the eval prompts) so the time difference
is what ftd adds. Run: `python -m bench.plain_pipeline CONFIG BASE_DIR OUT_DIR RESULT_JSON`; the
base directory is the built model (what a hub cache would hold). Prints nothing it does not time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


VARIANTS = {
    "identical": {"bf16": False, "gradient_checkpointing": False},  # what ftd passes on CPU
    "ftd-settings": {"bf16": False, "gradient_checkpointing": False},  # the same, training only
    "trl-defaults": {},  # TRL's own: bf16 autocast and gradient checkpointing, on CPU too
    "packing": {"bf16": False, "gradient_checkpointing": False, "packing": True},
    "ftd-settings-bf16": {"bf16": True, "gradient_checkpointing": False},  # ftd's sft.dtype: bfloat16
}


def main(config_path: str, base_dir: str, out_dir: str, result_path: str, variant: str = "identical") -> None:
    """`identical` runs the whole pipeline; the other variants stop after training (SFT throughput)."""
    import numpy as np
    import torch
    import yaml
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    class StepTimes(TrainerCallback):
        """Each step's wall time, end to end, as ftd's SFT task records it (the one addition to
        a hand-written script: a clock read per step), so the two runs pair step by step."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    phases = {"imports": time.perf_counter() - STARTED}
    cfg = yaml.safe_load(Path(config_path).read_text())
    adapter, target, smoke = cfg["adapters"][0], cfg["targets"][0], cfg["smoke"]
    lora, sft = adapter["lora"], adapter["sft"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)

    def rows(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def split(row: dict) -> tuple[list[dict], str]:
        messages = row[adapter["data"]["messages_field"]]
        return messages[:-1], messages[-1]["content"]

    t = time.perf_counter()
    train = [{"prompt": p, "completion": [{"role": "assistant", "content": c}]}
             for p, c in map(split, rows(adapter["data"]["train"]))]  # fmt: skip
    evals = [split(r) for r in rows(adapter["data"]["eval"])][: smoke["max_prompts"]]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if variant.endswith("-bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"), max_steps=sft["max_steps"], learning_rate=sft["learning_rate"],
        per_device_train_batch_size=sft["batch_size"], max_length=sft["max_length"],
        warmup_steps=sft["warmup_steps"], lr_scheduler_type=sft["scheduler"], seed=sft["seed"],
        data_seed=sft["seed"], logging_steps=10, save_steps=100, save_total_limit=2, report_to=[],
        disable_tqdm=True, use_cpu=True, **VARIANTS[variant],
    )  # fmt: skip
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")  # fmt: skip
    set_seed(sft["seed"])  # before peft draws the LoRA A matrices
    steps = StepTimes()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[steps])  # fmt: skip
    phases["sft_setup"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    phases["sft_train"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer.model.save_pretrained(out / "adapter")
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    del trainer, model
    phases["sft_save"] = time.perf_counter() - t
    if variant != "identical":
        Path(result_path).write_text(json.dumps({"phases": phases, "tokens_seen": tokens, "variant": variant,
                                                 "step_seconds": steps.seconds}))  # fmt: skip
        return

    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    phases["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(out / "merged"),
                    "-o", str(out / "engine"), "-p", target["precision"], "-e", target["device"],
                    "-c", str(out / "builder-cache")], check=True, capture_output=True)  # fmt: skip
    phases["build"] = time.perf_counter() - t

    # The checks a careful user runs before shipping: base and trained accuracy, adapter vs merged
    # vs engine greedy tokens and logits on the eval prompts.
    t = time.perf_counter()
    import onnxruntime_genai as og  # imported here, as ftd does: loaded before training, it slows torch

    eos = [tokenizer.eos_token_id]
    new = smoke["max_new_tokens"]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p, _ in evals]

    def torch_greedy(m, x):
        with torch.no_grad():
            o = m.generate(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                           max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                           output_logits=True, return_dict_in_generate=True)  # fmt: skip
        seq = o.sequences[0, len(x) :].tolist()
        return seq, [s[0].numpy() for s in o.logits][: len(seq)]

    def og_greedy(engine, x):
        params = og.GeneratorParams(engine)
        params.set_search_options(do_sample=False, max_length=len(x) + new)
        generator = og.Generator(engine, params)
        generator.append_tokens(np.asarray([x], dtype=np.int32))
        seq, logits = [], []
        for _ in range(new):
            logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1).copy())
            generator.generate_next_token()
            seq.append(int(generator.get_next_tokens()[0]))
            if seq[-1] in eos:
                break
        return seq, logits

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    outputs = {"base": [torch_greedy(base, x) for x in ids]}
    trained = PeftModel.from_pretrained(base, out / "adapter").eval()
    outputs["adapter"] = [torch_greedy(trained, x) for x in ids]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    outputs["merged"] = [torch_greedy(merged, x) for x in ids]
    engine = og.Model(str(out / "engine"))
    outputs["engine"] = [og_greedy(engine, x) for x in ids]

    def accuracy(name):
        answers = [tokenizer.decode(s, skip_special_tokens=True).strip() for s, _ in outputs[name]]
        return sum(a == c.strip() for a, (_, c) in zip(answers, evals)) / len(evals)

    def agreement(a, b):
        return sum(x[0] == y[0] for x, y in zip(outputs[a], outputs[b])) / len(ids)

    def logit_diff(a, b):
        return max(float(np.abs(p - q).max()) for x, y in zip(outputs[a], outputs[b]) for p, q in zip(x[1], y[1]))

    checks = {f"accuracy.{n}": accuracy(n) for n in outputs}
    for a, b in (("adapter", "merged"), ("merged", "engine")):
        checks[f"agreement.{a}_vs_{b}"] = agreement(a, b)
        checks[f"max_logit_diff.{a}_vs_{b}"] = logit_diff(a, b)
    phases["smoke"] = time.perf_counter() - t
    result = {"phases": phases, "total_seconds": time.perf_counter() - STARTED, "tokens_seen": tokens,
              "checks": checks, "adapter_dir": str(out / "adapter"), "step_seconds": steps.seconds}  # fmt: skip
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:6])
