"""Tiny base models the project builds itself, so tests and the default run need no hub.

A builtin is a *recipe*: a tokenizer trained with `tokenizers` on a corpus shipped in the repo,
plus a transformers config initialised with a fixed seed. Building one twice gives identical
bytes, so it is cached and versioned like any other artifact (its key hashes the recipe and the
corpus, not the output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "tiny.txt"

# Chat template with `{% generation %}` markers so trl can also mask non-assistant tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] }}</s>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines a builtin model's bytes (hashed into its artifact key)."""

    architecture: str
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    initializer_range: float = 0.3
    tie_word_embeddings: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)  # any further config kwargs; they override everything else

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to configure one architecture: its transformers `model_type`, and the settings it needs
    beyond the shared ones (a function of the recipe), e.g. to keep the og model builder on its
    plain path."""

    model_type: str
    settings: Callable[[TinyRecipe], dict] = lambda recipe: {}


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": ArchitectureSpec("llama"),
    # q/k/v projections always carry biases in Qwen2; no sliding window (the og builder's plain path).
    "Qwen2ForCausalLM": ArchitectureSpec("qwen2", lambda r: {"use_sliding_window": False}),
    # Fused qkv_proj and gate_up_proj. original == max position embeddings and no rope_scaling make
    # the og builder choose Phi3MiniModel (plain RoPE) instead of Phi3MiniLongRoPEModel.
    "Phi3ForCausalLM": ArchitectureSpec(
        "phi3",
        lambda r: {
            "original_max_position_embeddings": r.max_position_embeddings,
            "rope_scaling": None,
            "sliding_window": None,
        },
    ),
}

BUILTINS: dict[str, TinyRecipe] = {
    "tiny-llama": TinyRecipe(architecture="LlamaForCausalLM"),
    "tiny-qwen2": TinyRecipe(architecture="Qwen2ForCausalLM", tie_word_embeddings=True),
    "tiny-phi3": TinyRecipe(architecture="Phi3ForCausalLM"),
}


def train_tokenizer(recipe: TinyRecipe, corpus: Path = CORPUS):
    """Byte-level BPE with single-digit pre-tokenisation (numbers become digit sequences)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.max_position_embeddings,
    )


def make_config(recipe: TinyRecipe, tokenizer=None):
    """The transformers config of a builtin; without a tokenizer, ids are placeholders (for
    inspecting module names before anything is built)."""
    from transformers import AutoConfig

    spec = ARCHITECTURES[recipe.architecture]
    kwargs = {
        "vocab_size": len(tokenizer) if tokenizer is not None else recipe.vocab_size,
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "max_position_embeddings": recipe.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else None,
        "eos_token_id": tokenizer.eos_token_id if tokenizer is not None else None,
        "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else None,
        "tie_word_embeddings": recipe.tie_word_embeddings,
        "initializer_range": recipe.initializer_range,
        "architectures": [recipe.architecture],
        **spec.settings(recipe),
        **recipe.extra,
    }
    return AutoConfig.for_model(spec.model_type, **kwargs)


def build_tiny_model(name: str, out_dir: Path, corpus: Path = CORPUS) -> dict:
    """Write a builtin's HF model directory (safetensors + tokenizer) into `out_dir` (`corpus`:
    the tokenizer's training text, elsewhere when the repository is not at hand, as in a served
    adapter model)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    recipe = BUILTINS[name]
    tokenizer = train_tokenizer(recipe, corpus)
    config = make_config(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers zeroes biases; an engine that dropped them would still match
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):
                param.normal_(0.0, recipe.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
