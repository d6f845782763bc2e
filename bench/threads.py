"""SFT on a shared machine: the default experiment's SFT stage alone and beside processes that keep
every core busy, under torch's default threads and under the settings ftd could choose.

Each run is a cold `ftd run` of the default with no targets and `--steps` SFT steps (the stage's own
record gives its training seconds). "busy" starts one spinning process per core first (what
another job on the machine does), and stops them after.

    python -m bench.threads              # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ftd.store import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SETTINGS = {
    "torch default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
SPIN = "import time\nend = time.time() + {}\nwhile time.time() < end: pass\n"


def sft_seconds(work: Path, env_extra: dict, steps: int) -> float:
    artifacts = work / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "OMP_"))} | env_extra
    subprocess.run([sys.executable, "-m", "app.cli", "run", "configs/tiny-llama.yaml", "--set", f"artifacts_dir={artifacts}",
                    "--set", "targets=[]", "--set", f"adapters.0.sft.max_steps={steps}", "--set", "smoke.max_prompts=4"],
                   cwd=ROOT, env=env, check=True, capture_output=True)  # fmt: skip
    adapter = next((artifacts / "store" / "adapter").iterdir())
    return json.loads((adapter / MANIFEST).read_text())["meta"]["train_seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench-threads")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for load in ("alone", "busy"):
        for name, env in SETTINGS.items():
            hogs = []
            if load == "busy":
                hogs = [subprocess.Popen([sys.executable, "-c", SPIN.format(600)]) for _ in range(os.cpu_count() or 1)]
                time.sleep(1)
            try:
                seconds = sft_seconds(args.work, env, args.steps)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            rows.append({"load": load, "setting": name, "seconds": seconds, "per_step_ms": 1000 * seconds / args.steps})
            print(f"{load:5} {name:24} {seconds:7.2f} s ({rows[-1]['per_step_ms']:.0f} ms/step)", flush=True)
    base = {r["load"]: r["seconds"] for r in rows if r["setting"] == "torch default"}
    lines = ["# SFT on a shared machine (`python -m bench.threads`)", "",
             f"Default experiment's SFT, {args.steps} steps, {os.cpu_count()} CPUs; busy: one spinning process per core.", "",
             "| load | setting | SFT seconds | ms per step | vs torch default, same load |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['load']} | {r['setting']} | {r['seconds']:.2f} | {r['per_step_ms']:.0f} | "
              f"{r['seconds'] / base[r['load']]:.2f} |" for r in rows]  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
