"""Pipeline benchmarks: what `ftd run` costs against the plain script it replaces, and what a
rerun saves. Part of `python -m bench.run` (`--only pipeline` runs just this part).

Every run is a separate process timed from launch to exit, like a user's shell would time it.
"Cold" means no step of the experiment is cached: a fresh artifacts folder that already holds
migrated Prefect and MLflow databases (a user's second experiment; the very first run in a new
folder also creates them, measured once separately) and the base model (the builtin stands in
for a downloaded hub model, which the plain script is handed ready too). Rounds interleave the candidates, so slow
phases of a shared machine hit both sides; each ratio is taken per round, then the median.

1. overhead: `ftd run` of the default config vs `bench.plain_pipeline` (same data, settings, seed;
   their adapters are compared bit for bit, which proves the settings identical);
2. warm rerun of the unchanged config vs its cold run;
3. incremental: adapters 2, 3 and 4 added one by one to the round's cold experiment, each vs a
   cold run of the experiment it produces (2 and 4 adapters; 3 is not run cold);
4. SFT tokens/s: ours vs the plain script, over the whole training and step for step (the
   median of the per-step ratios: the same batches, so the pairs are like for like); and ftd's
   default settings vs TRL's defaults (and packing) with plain TRL, fewer steps;
5. scaling: cold time with 1, 2 and 4 adapters, and with 500, 1000, 2000 training rows (1 epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.stats import fmt, stats
from tasks.sft import STEP_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "tiny-llama.yaml"

# Sized for the whole harness (merge, decode, pipeline) to finish in ~20 min on 2 cores: the
# headline ratios (overhead, warm) get 3 rounds; the costlier incremental chain, the SFT settings
# comparison and the scaling points 2 each, so every figure is a median with a spread.
FULL = {
    "rounds": 3,
    "incremental_rounds": 2,  # adapters 2, 3, 4 added one by one; cold runs of 2 and 4 adapters
    "wide": 4,
    "variant_rounds": 2,
    "variant_steps": 120,
    "scaling_repeats": 2,
    "data_sizes": [500, 1000, 2000],
}
QUICK = {"rounds": 1, "incremental_rounds": 1, "wide": 3, "variant_rounds": 1, "variant_steps": 20,
         "scaling_repeats": 1, "data_sizes": [100, 200], "sft_steps": 30}  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def timed(command: list[str], log_file: Path) -> float:
    started = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(command, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({proc.returncode}); log: {log_file}\n"
                           + log_file.read_text()[-3000:])  # fmt: skip
    return seconds


class Bench:
    def __init__(self, work: Path, plan: dict, log):
        self.work, self.plan, self.log = work, plan, log
        self.configs = work / "configs"
        self.configs.mkdir(parents=True)
        self.count = 0

    # ------------------------------------------------------------ configs and runs

    def config(self, name: str, adapters: int = 1, train: Path | None = None, epochs: bool = False) -> Path:
        """The default experiment with `adapters` adapters on the shipped data (adapter i > 0: its
        own seed and rank), optionally on a subset of the training rows for one epoch."""
        cfg = yaml.safe_load(DEFAULT.read_text())
        first = cfg["adapters"][0]
        for split in ("train", "eval"):
            first["data"][split] = str(ROOT / first["data"][split])
        if train is not None:
            first["data"]["train"] = str(train)
        if epochs:
            first["sft"].update(max_steps=-1, epochs=1)
            cfg["smoke"]["thresholds"]["min_accuracy"] = 0.0  # one short epoch: timing, not quality
        if "sft_steps" in self.plan:
            first["sft"]["max_steps"] = self.plan["sft_steps"]
            cfg["smoke"]["thresholds"]["min_accuracy"] = 0.0
        if adapters > 1:  # a scaling point: timing, not quality (a seed may land a point below the gate)
            cfg["smoke"]["thresholds"]["min_accuracy"] = 0.0
        for i in range(1, adapters):
            extra = yaml.safe_load(yaml.safe_dump(first))
            extra["name"] = f"{first['name']}-{i + 1}"
            extra["lora"]["r"] = [4, 16, 8][(i - 1) % 3]
            extra["sft"]["seed"] = i
            cfg["adapters"].append(extra)
        path = self.configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def fresh_artifacts(self) -> Path:
        """A new artifacts folder whose databases are migrated and whose store holds only the base
        model: the builtin stands in for a downloaded model, which the plain script gets for free."""
        self.count += 1
        target = self.artifacts_now = self.work / f"artifacts-{self.count}"
        shutil.copytree(self.template, target, ignore=shutil.ignore_patterns("store", "checkpoints", "tmp"))
        shutil.copytree(self.template / "store" / "base", target / "store" / "base", symlinks=True)
        return target

    def ftd(self, config: Path, artifacts: Path, label: str, *args: str) -> dict:
        summary = self.work / f"summary-{label}-{self.count}.json"
        command = [sys.executable, "-m", "app.cli", "run", str(config), "--set", f"artifacts_dir={artifacts}",
                   "--summary", str(summary), *args]  # fmt: skip
        seconds = timed(command, self.work / f"{label}-{self.count}.log")
        result = json.loads(summary.read_text())
        stages = {f"{s['stage']}:{s['label']}": s for s in result["stages"]}
        trained = [
            _manifest(artifacts, s) for s in result["stages"] if s["stage"] == "adapter" and s["status"] == "built"
        ]
        train = [
            m["meta"] | {"step_seconds": json.loads((Path(m["path"]) / STEP_SECONDS).read_text())} for m in trained
        ]
        self.log(
            f"  ftd {label}: {seconds:.1f} s ({sum(s['status'] == 'built' for s in stages.values())} stages built)"
        )
        return {"seconds": seconds, "stages": stages, "train": train, "up_to_date": bool(result.get("up_to_date")),
                "adapter": next(_manifest(artifacts, s)["path"] for s in result["stages"] if s["stage"] == "adapter")}  # fmt: skip

    def plain(self, label: str, variant: str = "identical", config: Path | None = None) -> dict:
        out, result = self.work / f"plain-{label}-{self.count}", self.work / f"plain-{label}-{self.count}.json"
        self.count += 1
        command = [sys.executable, "-m", "bench.plain_pipeline", str(config or self.default), str(self.base_dir),
                   str(out), str(result), variant]  # fmt: skip
        seconds = timed(command, self.work / f"plain-{label}-{self.count}.log")
        data = json.loads(result.read_text())
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        self.log(f"  plain {label}: {seconds:.1f} s")
        return {"seconds": seconds, **data, "out": out}

    # ------------------------------------------------------------ the benchmarks

    def run(self) -> dict:
        self.default = self.config("default")
        self.template = self.work / "template"
        self.log("pipeline: preparing the stores (a 10-step run of the default in a new artifacts folder)")
        first = self.ftd(self.default, self.template, "first-run-new-folder", "--set", "adapters.0.sft.max_steps=10",
                         "--set", "smoke.thresholds.min_accuracy=0")  # fmt: skip
        self.base_dir = _base_dir(self.template)  # the built model, as a hub cache would hold it
        wide = self.plan["wide"]
        chain = {n: self.config(f"adapters-{n}", adapters=n) for n in range(2, wide + 1)}
        rounds = []
        for r in range(self.plan["rounds"]):
            self.log(f"pipeline round {r + 1}/{self.plan['rounds']}")
            artifacts = self.fresh_artifacts()
            plain = self.plain("identical") if r % 2 else None  # which goes first alternates by round
            cold = self.ftd(self.default, artifacts, "cold")
            plain = plain or self.plain("identical")
            warm = self.ftd(self.default, artifacts, "warm")
            if not warm["up_to_date"]:
                raise RuntimeError("the unchanged rerun was not up to date: its run record did not match")
            warm_flow = self.ftd(self.default, artifacts, "warm-rerun-flag", "--rerun")
            row: dict = {}
            if r < self.plan["incremental_rounds"]:  # the round's experiment grows one adapter at a time
                for n, config in chain.items():
                    added = self.ftd(config, artifacts, f"add-adapter-{n}")
                    trained = [
                        k for k, v in added["stages"].items() if k.startswith("adapter:") and v["status"] == "built"
                    ]
                    if len(trained) != 1:  # the earlier adapters must come from the cache
                        raise RuntimeError(f"adding adapter {n} trained {trained}, expected only the new one")
                    row[f"incremental_{n}"] = added["seconds"]
                for n in (2, wide):
                    row[f"cold_{n}"] = self.ftd(chain[n], self.fresh_artifacts(), f"cold-{n}-adapters")["seconds"]
            rounds.append(row | {
                "cold": cold["seconds"], "warm": warm["seconds"], "warm_flow": warm_flow["seconds"],
                "plain": plain["seconds"],
                "ours_tokens_per_s": _tokens_per_s(cold["train"][0]),
                "plain_tokens_per_s": plain["tokens_seen"] / plain["phases"]["sft_train"],
                "ours_step_ms": 1000 * statistics.median(cold["train"][0]["step_seconds"]),
                "plain_step_ms": 1000 * statistics.median(plain["step_seconds"]),
                "step_speed_ratio": _paired_step_ratio(cold["train"][0]["step_seconds"], plain["step_seconds"]),
                "plain_phases": plain["phases"], "cold_stages": {k: v["seconds"] for k, v in cold["stages"].items()},
                "adapters_equal": _adapters_equal(Path(cold["adapter"]) / "adapter", plain["out"] / "adapter"),
            })  # fmt: skip
            shutil.rmtree(plain["out"], ignore_errors=True)
        results = {"first_run_new_folder_s": first["seconds"], "rounds": rounds}
        results["sft_variants"] = self.sft_variants()
        results["scaling"] = self.scaling(rounds)
        return results

    def sft_variants(self) -> dict:
        """Plain TRL, training only, `variant_steps` steps: ftd's settings vs TRL's defaults vs packing."""
        config = self.config("variants")
        cfg = yaml.safe_load(config.read_text())
        cfg["adapters"][0]["sft"]["max_steps"] = self.plan["variant_steps"]
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        runs: dict[str, list[float]] = {"ftd-settings": [], "trl-defaults": [], "packing": []}
        for _ in range(self.plan["variant_rounds"]):
            for variant in runs:  # each its own process: trainings in one process slow the later ones
                result = self.plain(f"sft-{variant}", variant, config)
                runs[variant].append(result["tokens_seen"] / result["phases"]["sft_train"])
                shutil.rmtree(result["out"], ignore_errors=True)
        return {"steps": self.plan["variant_steps"], "tokens_per_s": {k: stats(v) for k, v in runs.items()},
                "ftd_over_trl_defaults": stats([a / b for a, b in zip(runs["ftd-settings"], runs["trl-defaults"])]),
                "packing_over_ftd": stats([a / b for a, b in zip(runs["packing"], runs["ftd-settings"])])}  # fmt: skip

    def scaling(self, rounds: list[dict]) -> dict:
        """Cold time by adapter count (the rounds' cold runs of 1, 2 and `wide` adapters) and by
        training rows (its own runs)."""
        by_adapters = {n: [r[field] for r in rounds if field in r]
                       for n, field in ((1, "cold"), (2, "cold_2"), (self.plan["wide"], f"cold_{self.plan['wide']}"))}  # fmt: skip
        rows = [json.loads(line) for line in (ROOT / "data/numbers/train.jsonl").read_text().splitlines() if line]
        by_rows = {}
        for size in self.plan["data_sizes"]:
            subset = self.configs / f"train-{size}.jsonl"
            subset.write_text("".join(json.dumps(r) + "\n" for r in rows[:size]))
            config = self.config(f"rows-{size}", train=subset, epochs=True)
            by_rows[size] = [self.ftd(config, self.fresh_artifacts(), f"cold-{size}-rows")["seconds"]
                             for _ in range(self.plan["scaling_repeats"])]  # fmt: skip
        return {"adapters": {n: stats(v) for n, v in sorted(by_adapters.items())},
                "train_rows": {n: stats(v) for n, v in by_rows.items()}}  # fmt: skip


def _manifest(artifacts: Path, stage: dict) -> dict:
    path = artifacts / "store" / stage["stage"] / stage["key"]
    return {**json.loads((path / "ftd-manifest.json").read_text()), "path": str(path)}


def _base_dir(artifacts: Path) -> Path:
    (found,) = [p for p in (artifacts / "store" / "base").iterdir() if (p / "config.json").is_file()]
    return found


def _tokens_per_s(meta: dict) -> float:
    return meta["tokens_seen"] / meta["train_seconds"]


def _paired_step_ratio(ours: list[float], plain: list[float]) -> float:
    """Our SFT speed over plain TRL's, step for step: the median over steps of plain's time for a
    step over ours for the same step (the same batch: the adapters are bitwise equal). A slow spell
    of the shared machine hits some steps of one run; the median of the pairs passes over it, where
    a ratio of whole-run totals takes it in full."""
    if len(ours) != len(plain):
        raise RuntimeError(f"ftd ran {len(ours)} SFT steps, the plain script {len(plain)}: not the same training")
    return statistics.median(p / o for o, p in zip(ours, plain, strict=True))


def _adapters_equal(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def bench_pipeline(work: Path, quick: bool, log) -> dict:
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    results = Bench(work / "pipeline", plan, log).run()
    rounds = results["rounds"]

    def ratio(a: str, b: str) -> dict:
        return stats([r[a] / r[b] for r in rounds if a in r])

    def seconds(a: str) -> dict:
        return stats([r[a] for r in rounds if a in r])

    results["summary"] = {
        "cold_s": seconds("cold"),
        "plain_s": seconds("plain"),
        "warm_s": seconds("warm"),
        "warm_flow_s": seconds("warm_flow"),
        **{f"incremental_{n}_s": seconds(f"incremental_{n}") for n in range(2, plan["wide"] + 1)},
        **{f"cold_{n}_s": seconds(f"cold_{n}") for n in (2, plan["wide"])},
        "overhead_ratio": ratio("cold", "plain"),
        "warm_ratio": ratio("warm", "cold"),
        "warm_flow_ratio": ratio("warm_flow", "cold"),
        **{f"incremental_{n}_ratio": ratio(f"incremental_{n}", f"cold_{n}") for n in (2, plan["wide"])},
        "sft_ratio": ratio("ours_tokens_per_s", "plain_tokens_per_s"),
        "sft_step_ratio": stats([r["step_speed_ratio"] for r in rounds]),
        "ours_step_ms": seconds("ours_step_ms"),
        "plain_step_ms": seconds("plain_step_ms"),
        "ours_tokens_per_s": stats([r["ours_tokens_per_s"] for r in rounds]),
        "plain_tokens_per_s": stats([r["plain_tokens_per_s"] for r in rounds]),
        "adapters_bitwise_equal": all(r["adapters_equal"] for r in rounds),
    }
    results["plan"] = plan
    results["seconds"] = time.perf_counter() - started
    return results


def pipeline_targets(p: dict) -> list[dict]:
    s = p["summary"]
    return [
        {"name": "cold flow ≤ 1.15× plain script", "value": s["overhead_ratio"]["median"],
         "met": s["overhead_ratio"]["median"] <= 1.15},
        {"name": "warm rerun ≤ 5% of cold", "value": s["warm_ratio"]["median"], "met": s["warm_ratio"]["median"] <= 0.05},
        *({"name": f"adding adapter {n} ≤ 40% of a cold run", "value": s[f"incremental_{n}_ratio"]["median"],
           "met": s[f"incremental_{n}_ratio"]["median"] <= 0.40} for n in (p["plan"]["wide"], 2)),
        {"name": "SFT tokens/s ≥ 0.95× plain TRL", "value": s["sft_ratio"]["median"], "met": s["sft_ratio"]["median"] >= 0.95},
    ]  # fmt: skip


def pipeline_markdown(p: dict) -> list[str]:
    s, v, plan = p["summary"], p["sft_variants"], p["plan"]
    n = plan["rounds"]
    rows = [
        ("full default flow, cold (s)", f"`ftd run` {fmt(s['cold_s'])}", f"plain script {fmt(s['plain_s'])}",
         fmt(s["overhead_ratio"], 2), "≤ 1.15"),
        ("rerun, unchanged config (s): up to date, nothing starts", f"warm {fmt(s['warm_s'], 2)}",
         f"cold {fmt(s['cold_s'])}", fmt(s["warm_ratio"], 3), "≤ 0.05"),
        *((f"adapter {n} added to a {n - 1}-adapter experiment (s)", f"incremental {fmt(s[f'incremental_{n}_s'])}",
           f"cold, {n} adapters {fmt(s[f'cold_{n}_s'])}", fmt(s[f"incremental_{n}_ratio"], 2), "≤ 0.40")
          for n in (plan["wide"], 2)),
        ("rerun with `--rerun` (s): the flow runs, every step a recorded cache hit",
         f"warm {fmt(s['warm_flow_s'])}", f"cold {fmt(s['cold_s'])}", fmt(s["warm_flow_ratio"], 3), "report"),
        ("SFT tokens/s, identical settings (which runs first alternates by round)",
         f"ftd {fmt(s['ours_tokens_per_s'], 0)}", f"plain TRL {fmt(s['plain_tokens_per_s'], 0)}",
         fmt(s["sft_ratio"], 3), "≥ 0.95"),
        ("SFT speed, same runs, step for step: median over the steps of plain's time for a step / ours for "
         "the same batch (ms per step: each run's median); passes over slow spells shorter than a run",
         f"ftd {fmt(s['ours_step_ms'], 2)}", f"plain TRL {fmt(s['plain_step_ms'], 2)}",
         fmt(s["sft_step_ratio"], 3), "report"),
        (f"SFT tokens/s, {v['steps']} steps, plain TRL", f"ftd's settings {fmt(v['tokens_per_s']['ftd-settings'], 0)}",
         f"TRL defaults {fmt(v['tokens_per_s']['trl-defaults'], 0)}", fmt(v["ftd_over_trl_defaults"], 2), "report"),
        (f"SFT tokens/s, {v['steps']} steps, plain TRL", f"packing {fmt(v['tokens_per_s']['packing'], 0)}",
         f"ftd's settings {fmt(v['tokens_per_s']['ftd-settings'], 0)}", fmt(v["packing_over_ftd"], 2), "report"),
    ]  # fmt: skip
    met = {r["name"]: r["met"] for r in pipeline_targets(p)}
    marks = list(met.values())[:4] + [None] + list(met.values())[4:] + [None, None, None]
    out = [
        f"### Pipeline (median (min–max) of {n} interleaved rounds; {plan['incremental_rounds']} for the added "
        f"adapters, {plan['variant_rounds']} for the "
        f"SFT settings; ratios per round)",
        "",
        "| benchmark | ours / candidate | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} | {d} | {e} | {'—' if m is None else 'yes' if m else '**no**'} |"
            for (a, b, c, d, e), m in zip(rows, marks)]  # fmt: skip
    middle = [n for n in range(3, plan["wide"])]
    out += ["", *(f"Adapter {n} added to the {n - 1}-adapter experiment on the way (not run cold): "
                  f"{fmt(s[f'incremental_{n}_s'])} s." for n in middle)]  # fmt: skip
    out += ["", f"Adapters of `ftd run` and the plain script bitwise equal in every round: "
            f"{'yes' if s['adapters_bitwise_equal'] else '**no**'}. First run in a new artifacts folder "
            f"(creates the Prefect and MLflow databases, builds the base model; 10 SFT steps): "
            f"{p['first_run_new_folder_s']:.1f} s.", ""]  # fmt: skip
    cold = p["rounds"][0]
    out += ["Where the time goes (round 1): `ftd run` stages " + ", ".join(
        f"{k.split(':')[0]} {sec:.1f}" for k, sec in cold["cold_stages"].items()) + " s; plain script " + ", ".join(
        f"{k} {sec:.1f}" for k, sec in cold["plain_phases"].items()) + " s.", ""]  # fmt: skip
    sc = p["scaling"]
    out += [f"Scaling, cold `ftd run` (s): by adapters, the rounds' cold runs above; by training rows, "
            f"{plan['scaling_repeats']} run(s) per point:", "",
            "| adapters | " + " | ".join(str(k) for k in sc["adapters"]) + " |",
            "|---|" + "---|" * len(sc["adapters"]),
            "| seconds | " + " | ".join(fmt(x) for x in sc["adapters"].values()) + " |", "",
            "| training rows (1 epoch) | " + " | ".join(str(k) for k in sc["train_rows"]) + " |",
            "|---|" + "---|" * len(sc["train_rows"]),
            "| seconds | " + " | ".join(fmt(x) for x in sc["train_rows"].values()) + " |", ""]  # fmt: skip
    return out
