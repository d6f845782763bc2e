"""LoRA supervised fine-tuning with trl's SFTTrainer and a peft LoraConfig.

Output: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) plus the
tokenizer actually used for training (with its chat template), so every later stage formats
prompts exactly as training did.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import threading
import time
from pathlib import Path

from ftd import termination
from ftd.config import AdapterConfig
from ftd.progress import Progress
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from ftd.tracking import render_loss_curve
from tasks.base_model import model_dir
from tasks.data import load_split
from tasks.logged_command import BuildLog
from tasks.modeling import load_model, load_tokenizer, resolve_dtype

STAGE = "adapter"
BASE_RECORD = "ftd-base.json"
LOSS_CURVE = "loss_curve.png"
STEP_SECONDS = "step_seconds.json"  # beside the adapter: each training step's wall time, in order
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
log = logging.getLogger("ftd.sft")
# transformers' Trainer and accelerate keep process-global state (AcceleratorState): two trainers
# built at once in one process (a sweep with `concurrency: 2`) break each other. Points of a sweep
# still overlap everything else; their SFT steps take turns.
ONE_TRAINER_PER_PROCESS = threading.Lock()


def sft_key(base: Artifact, data: Artifact, adapter: AdapterConfig, trust_remote_code: bool) -> str:
    sft = adapter.sft.model_dump(mode="json", exclude=set(adapter.sft.RUN_ONLY))
    config = {"lora": adapter.lora, "sft": sft, "trust_remote_code": trust_remote_code}
    return stage_key(
        STAGE,
        code=code_version(__file__, Path(__file__).parent / "modeling.py"),
        config=config,
        inputs=[base.key, data.key],
        libraries=library_versions(*LIBRARIES),
    )


def train_adapter(
    base: Artifact, data: Artifact, adapter: AdapterConfig, store: Store, trust_remote_code: bool = False
) -> Artifact:
    key = sft_key(base, data, adapter, trust_remote_code)

    def build(tmp: Path) -> dict:
        checkpoints = checkpoint_dir(store, key)
        if adapter.sft.num_processes > 1:
            meta = _train_distributed(base, data, adapter, store, trust_remote_code, tmp, checkpoints)
        else:
            with ONE_TRAINER_PER_PROCESS:
                meta = _train(base, data, adapter, store, trust_remote_code, tmp, checkpoints)
        (tmp / "adapter" / BASE_RECORD).write_text(json.dumps(base_record(base), indent=2))
        if meta["loss_curve"]:
            render_loss_curve(meta["loss_curve"], f"{adapter.name}.train_loss", tmp / LOSS_CURVE)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is complete: nothing left to resume
        return meta

    lineage = {"base": base.key, "data": data.key, "adapter_name": adapter.name}
    return store.materialize(STAGE, key, build, lineage=lineage)


def checkpoint_dir(store: Store, key: str) -> Path:
    """Checkpoints live outside the store's temp dirs, under the artifact's key: a rerun of the same
    stage (same config, code and inputs) finds them; any other run never does."""
    return store.root / "checkpoints" / f"{STAGE}-{key}"


def base_record(base: Artifact) -> dict:
    """Written beside every adapter ftd trains, so importing it onto another base can be refused."""
    return {"base_key": base.key, "base_source": base.meta.get("source"),
            "base_content_digest": base.meta.get("content_digest")}  # fmt: skip


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest `checkpoint-N` with every file a resume needs; a half-written one (the process
    was killed while saving) is deleted and the previous one used."""
    found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    for candidate in found:
        state = candidate / "trainer_state.json"
        needed = [
            state,
            candidate / "optimizer.pt",
            candidate / "scheduler.pt",
            candidate / "adapter_model.safetensors",
        ]
        if all(p.is_file() and p.stat().st_size > 0 for p in needed) and list(candidate.glob("rng_state*.pth")):
            try:
                json.loads(state.read_text())
                return candidate
            except json.JSONDecodeError:
                pass
        log.warning("removing incomplete checkpoint %s", candidate)
        shutil.rmtree(candidate, ignore_errors=True)
    return None


def _train(
    base: Artifact, data: Artifact, adapter: AdapterConfig, store: Store, trust_remote_code: bool, out: Path,
    checkpoints: Path,
) -> dict | None:  # fmt: skip
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    settings, lora = adapter.sft, adapter.lora
    tokenizer = load_tokenizer(model_dir(base), trust_remote_code, adapter.data.chat_template)
    dtype = resolve_dtype(settings.dtype)
    model = load_model(model_dir(base), trust_remote_code, dtype)
    train_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in load_split(data, store, "train")]

    class LogToLogger(TrainerCallback):
        """Loss lines in the log; step progress in the terminal and as a Prefect progress artifact;
        each step's wall time (end to end: data, forward, backward, optimizer, callbacks)."""

        def __init__(self):
            self.progress: Progress | None = None
            self.loss: float | None = None
            self.step_seconds: list[float] = []
            self.last_step_end = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(f"sft {adapter.name}", state.max_steps)
            self.last_step_end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                log.info("sft %s step %d/%d loss %.4f", adapter.name, state.global_step, state.max_steps, logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - self.last_step_end)
            self.last_step_end = now
            if self.progress is not None:
                self.progress.update(state.global_step, "" if self.loss is None else f"loss {self.loss:.4f}")
            termination.check()  # a stop request whose first raise was swallowed ends training here

    args = SFTConfig(
        output_dir=str(checkpoints),
        max_steps=settings.max_steps,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        packing=settings.packing,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=torch.cuda.is_available()
        if settings.gradient_checkpointing is None
        else settings.gradient_checkpointing,
        # Explicit: TRL otherwise trains in bf16 autocast (on CPU too), which neither matches
        # the configured dtype nor runs faster on CPU.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # The trainer seeds only when it is built, after peft has drawn the LoRA A matrices: without this
    # their initial values (and so the adapter) would depend on whatever ran before in the process.
    set_seed(settings.seed)
    steps = LogToLogger()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[steps],
    )
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    resume = last_complete_checkpoint(checkpoints) if settings.save_steps else None
    if resume is not None:
        log.info("sft %s: resuming from %s", adapter.name, resume)
    trainer.remove_callback(PrinterCallback)  # raw metric dicts on stdout: progress lines replace them
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None  # data-parallel training: rank 0 writes the adapter
    trainer.model.save_pretrained(out / "adapter", safe_serialization=True)
    # Per-step times, in step order: the benchmark pairs them with a plain TRL run's (the same
    # batches, step for step), which a shared machine's slow spells disturb far less than totals.
    (out / STEP_SECONDS).write_text(json.dumps([round(s, 6) for s in steps.step_seconds]))
    tokenizer.save_pretrained(out / "adapter")
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0) or None  # trl logs a running total
    return {
        "adapter_name": adapter.name,
        "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else None,
        "train_seconds": round(seconds, 3),
        "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "train_loss": result.training_loss,
        "loss_curve": losses,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / seconds, 1) if tokens else None,
        "median_step_seconds": round(statistics.median(steps.step_seconds), 6) if steps.step_seconds else None,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        # Where it trained, as the model's weights say (not what was asked for): a GPU run that
        # silently fell back to the CPU shows here, and scripts/gpu_check.sh asserts on it.
        "device": str(next(trainer.model.parameters()).device),
        "dtype": str(next(p for p in trainer.model.parameters() if not p.requires_grad).dtype).removeprefix("torch."),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "gpu_peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "lora": lora.model_dump(),
        "scale": lora.scale,
    }


TRAIN_META = "train-meta.json"


def _train_distributed(
    base: Artifact, data: Artifact, adapter: AdapterConfig, store: Store, trust_remote_code: bool, out: Path,
    checkpoints: Path,
) -> dict:  # fmt: skip
    """`sft.num_processes` > 1: the same `_train` in N data-parallel processes under torchrun
    (`python -m torch.distributed.run --standalone`); the Trainer sets up DDP from torchrun's
    environment (NCCL on GPUs, gloo on CPU). Rank 0 writes the adapter and the metadata."""
    import sys

    job = out / "distributed-job.json"
    job.write_text(json.dumps({
        "base": base.model_dump(mode="json"), "data": data.model_dump(mode="json"),
        "adapter": adapter.model_dump(mode="json"), "store": str(store.root), "out": str(out),
        "checkpoints": str(checkpoints), "trust_remote_code": trust_remote_code,
    }))  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={adapter.sft.num_processes}", "-m", "tasks.sft", str(job)]  # fmt: skip
    log.info("sft %s: %d processes: %s", adapter.name, adapter.sft.num_processes, " ".join(command[1:]))
    # The workers' log lines (steps, loss) go on to this process's log as they come; all of them
    # are kept in train.log beside the adapter.
    BuildLog(out / "train.log").run(command, f"sft {adapter.name}: distributed training", on_line=log.info)
    job.unlink()
    meta = json.loads((out / TRAIN_META).read_text())
    (out / TRAIN_META).unlink()
    return meta | {"num_processes": adapter.sft.num_processes}


def _distributed_worker(job_file: str) -> None:
    """One torchrun process: rebuild the inputs from the job file and train."""
    job = json.loads(Path(job_file).read_text())
    meta = _train(
        Artifact(**job["base"]), Artifact(**job["data"]), AdapterConfig(**job["adapter"]), Store(job["store"]),
        job["trust_remote_code"], Path(job["out"]), Path(job["checkpoints"]),
    )  # fmt: skip
    if meta is not None:  # rank 0
        (Path(job["out"]) / TRAIN_META).write_text(json.dumps(meta))


def adapter_dir(adapter: Artifact, store: Store) -> Path:
    return adapter.path(store) / "adapter"


if __name__ == "__main__":  # a torchrun worker (see _train_distributed)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _distributed_worker(sys.argv[1])
