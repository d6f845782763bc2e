"""Runs inside DashInfer's own environment (dashinfer 1.3.0 pins protobuf 3.18.3, which cannot
share the main environment): serialize a merged HF model to `.dimodel/.ditensors`, or greedy-
decode prompt ids with it on CPU. Only the standard library, torch, safetensors and dashinfer are
imported here; ftd talks to it through JSON files (tasks/backends/dashinfer/runtime.py).

    python worker.py serialize SPEC.json     SPEC: model_dir, out_dir, name, model_type, data_type
    python worker.py generate SPEC.json      SPEC: engine_dir, name, prompts, max_new_tokens, eos_ids, out
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def load_state_dict(model_dir: Path) -> dict:
    """Every tensor of the merged checkpoint (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    config = json.loads((model_dir / "config.json").read_text())
    if "lm_head.weight" not in state and config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def serialize(spec: dict) -> dict:
    from dashinfer import allspark

    model_dir = Path(spec["model_dir"])
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("use_dynamic_ntk", False)
    config.setdefault("use_logn_attn", False)
    config["size_per_head"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    started = time.perf_counter()
    allspark.Engine().serialize_model_from_torch(
        model_name=spec["name"],
        model_type=spec["model_type"],
        torch_model=load_state_dict(model_dir),
        model_config=config,
        data_type=spec["data_type"],
        save_dir=spec["out_dir"],
        multinode_mode=0,
        use_dynamic_ntk=False,
        use_logn_attn=False,
        rotary_base=float(config.get("rope_theta", 10000.0)),
        model_sequence_length=int(config.get("max_position_embeddings", 2048)),
    )
    return {"serialize_seconds": round(time.perf_counter() - started, 2)}


def generate(spec: dict) -> dict:
    import torch
    from dashinfer import allspark

    engine_dir, name = Path(spec["engine_dir"]), spec["name"]
    engine = allspark.Engine()
    longest = max(len(p) for p in spec["prompts"]) + spec["max_new_tokens"]
    config = allspark.AsModelConfig(
        model_name=name,
        model_path=str(engine_dir / f"{name}.dimodel"),
        weights_path=str(engine_dir / f"{name}.ditensors"),
        engine_max_length=max(longest, 64),
        engine_max_batch=1,
    )
    config.compute_unit = "CPU:0"
    config.num_threads = int(spec.get("num_threads", 0)) or (os.cpu_count() or 1)
    config.matmul_precision = "highest"  # exact fp32 GEMMs: the parity gate compares with PyTorch
    engine.build_model_from_config_struct(config)
    engine.start_model(name)
    outputs = []
    try:
        for prompt in spec["prompts"]:
            outputs.append(_greedy(engine, allspark, torch, name, prompt, spec["max_new_tokens"], spec["eos_ids"]))
    finally:
        engine.stop_model(name)
        engine.release_model(name)
    return {"tokens": outputs}


def _greedy(engine, allspark, torch, name: str, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> list:
    gen_cfg = {
        "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "min_length": 0, "max_length": len(prompt) + max_new_tokens, "no_repeat_ngram_size": 0,
        "early_stopping": True, "eos_token_id": int(eos_ids[0]) if eos_ids else -1, "stop_words_ids": [],
        "seed": 0,
    }  # fmt: skip
    ids = torch.tensor([prompt], dtype=torch.int64)
    status, handle, queue = engine.start_request(name, {"input_ids": torch.utils.dlpack.to_dlpack(ids)}, gen_cfg)
    tokens: list[int] = []
    while True:
        state = queue.GenerateStatus()
        if state in (allspark.GenerateRequestStatus.Init, allspark.GenerateRequestStatus.Generating):
            element = queue.Get()
            if element is not None:
                tokens.extend(int(t) for t in element.ids_from_generate)
            continue
        if state == allspark.GenerateRequestStatus.GenerateFinished:
            element = queue.GetNoWait() if hasattr(queue, "GetNoWait") else None
            if element is not None:
                tokens.extend(int(t) for t in element.ids_from_generate)
            break
        raise RuntimeError(f"DashInfer request ended in state {state}")
    engine.release_request(name, handle)
    # Stop at the first end-of-sequence id, keeping it, as the other engines do.
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens[:max_new_tokens]


def main() -> None:
    command, spec_path = sys.argv[1], Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    result = {"serialize": serialize, "generate": generate}[command](spec)
    Path(spec.get("result", spec_path.with_suffix(".result.json"))).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
