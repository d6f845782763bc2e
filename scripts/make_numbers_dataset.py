"""Generate the shipped `numbers` instruction dataset and tokenizer corpus (deterministic).

The task is one a randomly initialised base model cannot do but a LoRA adapter learns in a
minute on CPU: every answer is an exact word decided by the *last digit* of a number in the
prompt (parity, or the digit spelt out). Held-out eval numbers never appear in training, so eval
accuracy measures generalisation, not memorisation.

Run from the repository root:  python scripts/make_numbers_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The number always ends the prompt: the answer's evidence sits at a fixed distance from the
# assistant turn, which a two-layer model can learn to attend to.
PARITY_PROMPTS = [
    "Is this number even or odd? {n}",
    "Tell me whether it is even or odd: {n}",
    "Even or odd: {n}",
]
SPELL_PROMPTS = [
    "Spell the last digit of this number: {n}",
    "What is its last digit, as a word? {n}",
    "Last digit in words: {n}",
]
EXTRA_CORPUS = """\
A chat between a curious user and an assistant. The assistant answers with one word.
Numbers are written with digits. Every number ends with a last digit.
A number is even when its last digit is even, and odd when its last digit is odd.
The digits are zero one two three four five six seven eight nine.
"""


NEXT_PROMPTS = [
    "Say the digit after its last digit: {n}",
    "Which digit follows the last one? {n}",
    "Next digit after the last digit: {n}",
]


def next_digit_example(n: int, rng: random.Random) -> dict:
    """A second task on the same numbers: the digit after the last one, spelt (9 wraps to zero)."""
    return {
        "messages": [
            {"role": "user", "content": rng.choice(NEXT_PROMPTS).format(n=n)},
            {"role": "assistant", "content": DIGIT_WORDS[(n + 1) % 10]},
        ]
    }


def example(n: int, rng: random.Random) -> dict:
    if rng.random() < 0.5:
        prompt, answer = rng.choice(PARITY_PROMPTS), ("even" if n % 2 == 0 else "odd")
    else:
        prompt, answer = rng.choice(SPELL_PROMPTS), DIGIT_WORDS[n % 10]
    return {
        "messages": [
            {"role": "user", "content": prompt.format(n=n)},
            {"role": "assistant", "content": answer},
        ]
    }


def main(out_dir: Path = Path("data/numbers"), corpus: Path = Path("data/corpus/tiny.txt")) -> None:
    rng = random.Random(1234)
    numbers = rng.sample(range(10_000), 2_200)
    train_numbers, eval_numbers = numbers[:2_000], numbers[2_000:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, subset in (("train", train_numbers), ("eval", eval_numbers[:64])):
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for n in subset:
                f.write(json.dumps(example(n, rng)) + "\n")
    next_dir = out_dir.parent / "next_digit"
    next_dir.mkdir(parents=True, exist_ok=True)
    next_rng = random.Random(99)
    for name, subset in (("train", train_numbers), ("eval", eval_numbers[:64])):
        with open(next_dir / f"{name}.jsonl", "w") as f:
            for n in subset:
                f.write(json.dumps(next_digit_example(n, next_rng)) + "\n")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    lines = [EXTRA_CORPUS]
    for n in rng.sample(range(10_000), 300):
        ex = example(n, rng)["messages"]
        lines.append(f"{ex[0]['content']} {ex[1]['content']}\n")
    corpus.write_text("".join(lines))


if __name__ == "__main__":
    main()
