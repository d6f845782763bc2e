"""Large data: the data stage on generated JSONL files of growing size, its time and peak RSS.

Each size is a JSONL of chat rows (`messages`, a user question and an answer of varied length),
prepared by `tasks.data.prepare_data` in a process of its own, with the builtin tiny-llama's
tokenizer counting tokens as training would (max_length 64) and 1% held out for eval. Peak RSS is
measured as a stage's is in a run (ftd.memory: from after the imports, worker processes included).

    python -m bench.data_scale                  # 256, 512 and 1024 MB (~10 min on 2 cores)
    python -m bench.data_scale --sizes 2048     # the 2 GB point
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "number", "digit", "spell", "answer", "question", "model", "data"]  # fmt: skip

CHILD = """
import json, sys, time
from pathlib import Path
from ftd.config import DataConfig
from ftd.store import Store
from tasks.base_model import parse_base, resolve_base
from tasks.data import prepare_data
import datasets, transformers  # imported before the clock and the memory mark
store = Store(Path(sys.argv[2]))
base = resolve_base(parse_base("builtin:tiny-llama", None), store)
from ftd.memory import PeakMemory
started = time.perf_counter()
with PeakMemory() as peak:  # this process's own peak since here, plus its worker processes'
    data = prepare_data(DataConfig(train=sys.argv[1], eval_fraction=0.01), store, base, 64)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak.bytes / 1e6, "meta": data.meta}))
"""


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    """A JSONL of about `megabytes` MB; returns its row count."""
    rng = random.Random(seed)
    target, written, rows = megabytes * 1_000_000, 0, 0
    with open(path, "w") as f:
        while written < target:
            question = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 60)))
            line = json.dumps({"messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}) + "\n"  # fmt: skip
            f.write(line)
            written += len(line)
            rows += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512,1024", help="JSONL sizes in MB")
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-data-scale")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = RESULTS / "data-scale"
    folder.mkdir(parents=True, exist_ok=True)
    for mb in (int(s) for s in args.sizes.split(",")):
        source = args.work / f"{mb}mb.jsonl"
        rows = generate(source, mb)
        store = args.work / f"store-{mb}"
        shutil.rmtree(store, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(store)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        record = {"megabytes": mb, "bytes": source.stat().st_size, "rows": rows, **result}
        (folder / f"{mb}.json").write_text(json.dumps(record, indent=2))
        print(f"{mb} MB, {rows} rows: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
        source.unlink()
        shutil.rmtree(store, ignore_errors=True)
    every = sorted((json.loads(f.read_text()) for f in folder.glob("*.json")), key=lambda r: r["bytes"])
    lines = ["# Large data: the data stage (`python -m bench.data_scale`)", "",
             f"Generated chat JSONL, normalised and token-counted (tiny-llama tokenizer, max_length 64) by "
             f"`prepare_data` in its own process; {os.cpu_count()} CPUs. Peak RSS: the stage's, after the imports, "
             "its worker processes included (ftd.memory).", "",
             "| JSONL | rows | seconds | MB/s | s per GB vs the smallest | peak RSS |", "|---|---|---|---|---|---|"]  # fmt: skip
    first = every[0]["seconds"] / every[0]["bytes"]
    for r in every:
        lines.append(f"| {r['bytes'] / 1e9:.2f} GB | {r['rows']:,} | {r['seconds']:.1f} | {r['bytes'] / 1e6 / r['seconds']:.1f} | "
                     f"{r['seconds'] / r['bytes'] / first:.2f} | {r['peak_rss_mb']:.0f} MB |")  # fmt: skip
    (RESULTS / "data-scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
