"""Export a merged HF Llama to a LLaMA2-Accessory checkpoint, and prove it on CPU.

Accessory builds `ModelArgs(**config.json)` (so config.json holds only ModelArgs fields) and loads
its `consolidated.RR-of-WW.model.pth` shards with `load_state_dict(strict=False)`: a misnamed weight
would silently stay random. So `load_accessory` (the format read back independently) and
`AccessoryLlama` (a Meta-style forward) must reproduce the HF logits. HF stores q/k permuted for
rotate-half rotary; Accessory rotates interleaved pairs, so q/k are un-permuted on export.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ftd.errors import FtdError
from tasks.backends.runtime import Generation

STOP_SIGNAL = "###"  # the default conversation's separator; Accessory's response_end_signal is "\n###"
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
CONVERSATION_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
REFUSED_WHY = {
    "Qwen2ForCausalLM": "its q/k/v projections have biases, which Accessory's llama has no place for",
    "Phi3ForCausalLM": "it fuses qkv_proj and gate_up_proj, which Accessory's llama keeps separate",
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# HF module (inside model.layers.{i}.) -> Accessory module (inside layers.{i}.)
LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """Accessory's single-turn template (`format_prompt(..., sys_name="alpaca")`); a blank input uses
    the no-input variant, as Accessory does, so training and serving prompts agree."""
    if input is None or not input.strip():
        return ALPACA_NO_INPUT.format(instruction=instruction)
    return ALPACA_INPUT.format(instruction=instruction, input=input)


def conversation_prompt(turns: list[tuple[str, str | None]]) -> str:
    """Accessory's default multi-turn template; the last answer may be None (the one to generate)."""
    text = CONVERSATION_SYSTEM + "\n\n" + STOP_SIGNAL
    for i, (question, answer) in enumerate(turns):
        text += f" Human: {question}\n{STOP_SIGNAL}"
        if answer is None and i != len(turns) - 1:
            raise FtdError(f"conversation turn {i}: only the last answer may be None")
        text += " Assistant:" if answer is None else f" Assistant: {answer}\n{STOP_SIGNAL}"
    return text


def accessory_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width Accessory's FeedForward derives from `4 * dim` (it has no explicit field)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_args(dim: int, intermediate: int, where: Path) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Accessory rebuild exactly `intermediate`: the
    Llama-2 default (256, None) when it fits, else multiple_of = intermediate with the ratio as
    multiplier (int() then lands on intermediate or intermediate-1, which rounds up to it)."""
    base = int(2 * (4 * dim) / 3)
    for multiple_of, mult in ((256, None), (intermediate, intermediate / base)):
        if accessory_hidden_dim(dim, multiple_of, mult) == intermediate:
            return multiple_of, mult
    raise FtdError(f"{where}: intermediate_size {intermediate} is not reachable by Accessory's FFN sizing (dim {dim})")


def accessory_args(hf: dict, where: Path) -> dict:
    """Accessory llama ModelArgs for an HF config, refusing what the llama type cannot express."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        why = REFUSED_WHY.get(arch, f"only {', '.join(SUPPORTED)} map onto Accessory's llama")
        raise FtdError(f"{where}: architecture {arch} is not supported for Accessory export: {why}")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    problems = [f"{k}={hf[k]}" for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if hf.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        problems.append(f"head_dim={hf.get('head_dim')} (Accessory uses hidden_size/num_attention_heads)")
    if hf.get("rope_scaling"):
        problems.append(f"rope_scaling={hf['rope_scaling']} (Accessory's llama rotary is unscaled here)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']} (Accessory uses SwiGLU with silu)")
    window, max_pos = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if window is not None and hf.get("use_sliding_window", True) and window < max_pos:
        problems.append(f"sliding_window={window} < max_position_embeddings={max_pos} (Accessory's llama has none)")
    if problems:
        raise FtdError(f"{where}: cannot export to Accessory's llama: {'; '.join(problems)}")
    multiple_of, mult = _ffn_args(dim, hf["intermediate_size"], where)
    return {"dim": dim, "n_layers": hf["num_hidden_layers"], "n_heads": n_heads, "n_kv_heads": n_kv,
            "vocab_size": hf["vocab_size"], "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "rope_theta": float(hf.get("rope_theta", 10000.0)),
            "max_seq_len": max_pos}  # fmt: skip


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of Meta->HF `view(n, hd//2, 2, in).transpose(1, 2)`: back to interleaved rotary pairs."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _split_dim(name: str) -> int | None:
    """Model-parallel split axis of an Accessory weight: column-parallel on 0, row-parallel and
    the embedding on 1, norms replicated (None)."""
    if re.search(r"attention\.w[qkv]\.|feed_forward\.w[13]\.|^output\.", name):
        return 0
    if re.search(r"attention\.wo\.|feed_forward\.w2\.|^tok_embeddings\.", name):
        return 1
    return None


def _hf_weights(merged_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({merged_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FtdError(f"{index}: lists shards that are missing: {', '.join(missing)}")
    else:
        files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise FtdError(f"{merged_dir}: no *.safetensors weights (Accessory export reads safetensors only)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def _to_accessory(hf: dict[str, torch.Tensor], args: dict, tied: bool, where: Path) -> dict[str, torch.Tensor]:
    """HF names -> Accessory names (no `llma.`), q/k un-permuted; anything unmapped is refused."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        target = f"layers.{m[1]}.{LAYER_NAMES[m[2]]}" if m and m[2] in LAYER_NAMES else None
        if target is None and name.endswith(".weight"):
            target = TOP_NAMES.get(name.removesuffix(".weight"))
        if target is None:
            raise FtdError(f"{where}: weight {name} has no place in Accessory's llama (biases or fused layers?)")
        if target.endswith(("attention.wq", "attention.wk")):
            tensor = _unpermute(tensor, args["n_heads"] if target.endswith("wq") else args["n_kv_heads"])
        out[target + ".weight"] = tensor
    if "output.weight" not in out:
        if not tied:
            raise FtdError(f"{where}: no lm_head.weight and tie_word_embeddings is false")
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def export_accessory(merged_dir: Path, out: Path, model_parallel_size: int = 1, dtype: str = "auto") -> dict:
    """Write `merged_dir` as an Accessory checkpoint into the existing empty folder `out`."""
    merged_dir, out, mp = Path(merged_dir), Path(out), model_parallel_size
    if not out.is_dir() or any(out.iterdir()):
        raise FtdError(f"{out}: the Accessory output folder must exist and be empty")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise FtdError(f"dtype {dtype!r}: expected auto, float32, float16 or bfloat16")
    hf_config = json.loads((merged_dir / "config.json").read_text())
    args = accessory_args(hf_config, merged_dir / "config.json")
    for what in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size"):
        n = hf_config.get(what) or args["n_heads"]  # num_key_value_heads may be absent: then it is n_heads
        if mp < 1 or n % mp:
            raise FtdError(f"{merged_dir}: {what}={n} is not divisible by model_parallel_size={mp}")
    tokenizer_files = [f for f in TOKENIZER_FILES if (merged_dir / f).is_file()]
    has_hf_tokenizer = {"tokenizer.json", "tokenizer_config.json"} <= set(tokenizer_files)
    if "tokenizer.model" not in tokenizer_files and not has_hf_tokenizer:
        raise FtdError(f"{merged_dir}: no tokenizer.model nor tokenizer.json + tokenizer_config.json to copy")
    if "tokenizer.model" not in tokenizer_files:  # Accessory sets vocab_size = len(tokenizer): they must agree
        from transformers import AutoTokenizer

        n_words = len(AutoTokenizer.from_pretrained(merged_dir))
        if n_words != args["vocab_size"]:
            raise FtdError(
                f"{merged_dir}: len(tokenizer)={n_words} but vocab_size={args['vocab_size']}; "
                "Accessory sizes the embedding from the tokenizer"
            )
    state = _to_accessory(_hf_weights(merged_dir), args, bool(hf_config.get("tie_word_embeddings")), merged_dir)
    check_shapes(args, state, merged_dir)  # the args must rebuild exactly these shapes in Accessory
    if dtype != "auto":
        state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    files = []
    for rank in range(mp):
        shard = {}
        for name, tensor in state.items():
            axis = _split_dim(name)  # clone: a chunk view would save the whole storage
            shard["llma." + name] = (tensor if axis is None else torch.chunk(tensor, mp, axis)[rank]).clone()
        path = out / f"consolidated.{rank:02d}-of-{mp:02d}.model.pth"
        torch.save({"model": shard}, path)
        files.append({"file": path.name, "bytes": path.stat().st_size})
    (out / "config.json").write_text(json.dumps(args, indent=2) + "\n")
    (out / "meta.json").write_text(json.dumps({"llama_type": "llama"}) + "\n")
    for name in tokenizer_files:
        shutil.copy2(merged_dir / name, out / name)
    return {"shards": files, "args": args, "model_parallel_size": mp, "tokenizer_files": tokenizer_files,
            "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}  # fmt: skip


# ---------------------------------------------------------------- reading it back, from the format alone

SHARD_NAME = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
CONCAT_AXIS = ((r"layers\.\d+\.attention\.w[qkv]\.weight", 0), (r"layers\.\d+\.attention\.wo\.weight", 1),
               (r"layers\.\d+\.feed_forward\.w[13]\.weight", 0), (r"layers\.\d+\.feed_forward\.w2\.weight", 1),
               (r"output\.weight", 0), (r"tok_embeddings\.weight", 1),
               (r"(layers\.\d+\.(attention|ffn)_norm|norm)\.weight", None))  # fmt: skip


def expected_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """Every full (unsplit) weight Accessory's llama builds from these ModelArgs, with its shape."""
    dim, n_heads = args["dim"], args["n_heads"]
    kv, hd = (args.get("n_kv_heads") or n_heads), dim // n_heads
    ffn = accessory_hidden_dim(dim, args.get("multiple_of", 256), args.get("ffn_dim_multiplier"))
    shapes = {"tok_embeddings.weight": (args["vocab_size"], dim), "norm.weight": (dim,),
              "output.weight": (args["vocab_size"], dim)}  # fmt: skip
    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (n_heads * hd, dim), p + "attention.wk.weight": (kv * hd, dim),
                   p + "attention.wv.weight": (kv * hd, dim), p + "attention.wo.weight": (dim, n_heads * hd),
                   p + "feed_forward.w1.weight": (ffn, dim), p + "feed_forward.w2.weight": (dim, ffn),
                   p + "feed_forward.w3.weight": (ffn, dim), p + "attention_norm.weight": (dim,),
                   p + "ffn_norm.weight": (dim,)}  # fmt: skip
    return shapes


def check_shapes(args: dict, state: dict[str, torch.Tensor], where: Path | str) -> None:
    want = expected_shapes(args)
    wrong = [f"{k}: missing" for k in want if k not in state] + [f"{k}: unexpected" for k in state if k not in want]
    bad = {k: v for k, v in state.items() if k in want and tuple(v.shape) != want[k]}
    wrong += [f"{k}: {list(v.shape)}, config implies {list(want[k])}" for k, v in bad.items()]
    if wrong:
        raise FtdError(f"{where}: weights do not fit config.json: {'; '.join(wrong[:5])}")


def load_accessory(checkpoint_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ModelArgs dict, full state dict without `llma.`), any model-parallel size reassembled."""
    root = Path(checkpoint_dir)
    for needed in ("meta.json", "config.json"):
        if not (root / needed).is_file():
            raise FtdError(
                f"{root}: no {needed}: not a LLaMA2-Accessory checkpoint (legacy ones without it are not read)"
            )
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("llama_type") != "llama":
        raise FtdError(f"{root / 'meta.json'}: llama_type {meta.get('llama_type')!r}, only 'llama' is read")
    args = json.loads((root / "config.json").read_text())
    found = sorted((int(m[1]), int(m[2])) for p in root.iterdir() if (m := SHARD_NAME.match(p.name)))
    world_size = found[0][1] if found else 0  # Accessory counts the matching files: stale extras would break it
    if not found or found != [(r, world_size) for r in range(world_size)]:
        raise FtdError(f"{root}: incomplete or mixed consolidated.RR-of-WW.model.pth files (rank, world): {found}")
    ranks = []
    for r in range(world_size):
        path = root / f"consolidated.{r:02d}-of-{world_size:02d}.model.pth"
        model = torch.load(path, weights_only=True, map_location="cpu").get("model")
        if not isinstance(model, dict) or not all(k.startswith("llma.") for k in model):
            raise FtdError(f"{path}: expected {{'model': {{'llma.<name>': tensor}}}}")
        ranks.append({k.removeprefix("llma."): v for k, v in model.items()})
    state: dict[str, torch.Tensor] = {}
    for name in ranks[0]:
        axis = next((a for pattern, a in CONCAT_AXIS if re.fullmatch(pattern, name)), "unknown")
        parts = [rank.get(name) for rank in ranks]
        if axis == "unknown" or any(p is None for p in parts):
            raise FtdError(f"{root}: {name} is not an Accessory llama weight or is missing from some ranks")
        if axis is None and not all(torch.equal(parts[0], p) for p in parts):
            raise FtdError(f"{root}: replicated {name} differs between ranks")
        state[name] = parts[0] if axis is None else torch.cat(parts, axis)
    check_shapes(args, state, root)
    return args, state


class AccessoryLlama(torch.nn.Module):
    """Meta-style Llama forward (as Accessory's llama runs it), fp32 on CPU, for parity checks."""

    def __init__(self, args: dict, state: dict[str, torch.Tensor]):
        super().__init__()
        check_shapes(args, state, "AccessoryLlama")
        self.args, self.w = args, {k: v.float() for k, v in state.items()}

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.args["norm_eps"]) * self.w[name]

    def _rotate(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (b, s, heads, hd/2), interleaved
        return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        a, w = self.args, self.w
        bsz, seq = tokens.shape
        n_heads, n_kv = a["n_heads"], a.get("n_kv_heads") or a["n_heads"]
        hd = a["dim"] // n_heads
        inv = 1.0 / (a.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        freqs = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), inv))
        h = F.embedding(tokens, w["tok_embeddings.weight"])
        for i in range(a["n_layers"]):
            p = f"layers.{i}."
            x = self._rms(h, p + "attention_norm.weight")
            q = self._rotate((x @ w[p + "attention.wq.weight"].T).view(bsz, seq, n_heads, hd), freqs)
            k = self._rotate((x @ w[p + "attention.wk.weight"].T).view(bsz, seq, n_kv, hd), freqs)
            v = (x @ w[p + "attention.wv.weight"].T).view(bsz, seq, n_kv, hd)
            k, v = (t.repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2) for t in (k, v))
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
            h = h + att.transpose(1, 2).reshape(bsz, seq, -1) @ w[p + "attention.wo.weight"].T
            x = self._rms(h, p + "ffn_norm.weight")
            gate = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
            h = h + gate @ w[p + "feed_forward.w2.weight"].T
        return self._rms(h, "norm.weight") @ w["output.weight"].T

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
        """New token ids, argmax each step (full recompute), stopping after an eos id."""
        return self.generation(prompt_ids, max_new_tokens, eos_ids).tokens

    def generation(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]):
        """The smoke test's `Engine.greedy` contract: tokens plus each step's logits."""

        ids, new, logits = list(prompt_ids), [], []
        for _ in range(max_new_tokens):
            step = self.forward(torch.tensor([ids]))[0, -1]
            logits.append(step.numpy())
            new.append(int(step.argmax()))
            ids.append(new[-1])
            if new[-1] in eos_ids:
                break
        return Generation(tokens=new, logits=logits)
