"""DashInfer's own Python environment, created on first use.

dashinfer 1.3.0 (the CPU build for CPython 3.11) pins protobuf 3.18.3, while onnx and mlflow need
protobuf ≥ 4, and its generated code fails under newer protobuf: it cannot share ftd's
environment. So ftd creates a virtualenv from the package registry the first time a DashInfer
target is used (about 30 s, ~1 GB with the CPU torch wheel) and talks to it through
`tasks/backends/dashinfer/worker.py` as a subprocess. The environment lives in a user cache (not in the
artifact store: it is a tool, not an output), named by a hash of its pinned requirements, built
in a temporary directory and renamed into place under a lock — a crash never leaves a half-built
environment that a later run would use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from ftd.errors import FtdError

REQUIREMENTS = ("dashinfer==1.3.0", "torch==2.13.0", "numpy>=1.26,<3", "safetensors>=0.6")
WORKER = Path(__file__).parent / "worker.py"


def cache_root() -> Path:
    if os.environ.get("FTD_CACHE_DIR"):
        return Path(os.environ["FTD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftd"


def env_dir() -> Path:
    tag = hashlib.sha256("\n".join([sys.version.split()[0], *REQUIREMENTS]).encode()).hexdigest()[:12]
    return cache_root() / "envs" / f"dashinfer-1.3.0-{tag}"


def python_of(directory: Path) -> Path:
    return directory / "bin" / "python"


def platform_problem() -> str | None:
    """Why DashInfer's CPU build cannot run on this machine, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"DashInfer's CPU build needs Linux x86_64 (this is {sys.platform}/{platform.machine()})"
    if sys.version_info[:2] != (3, 11):
        return f"dashinfer 1.3.0 is installed for CPython 3.11 by ftd (this is {sys.version.split()[0]})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if " avx2" not in flags:
        return "DashInfer's CPU build needs a CPU with AVX2"
    return None


def ensure_env() -> Path:
    """The environment's python, creating the environment if needed."""
    target = env_dir()
    if (target / ".ready").is_file():
        return python_of(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".ready").is_file():
            return python_of(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _run([sys._base_executable, "-m", "venv", str(tmp)], "create the virtualenv")
            _run([str(python_of(tmp)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *REQUIREMENTS], "install " + " ".join(REQUIREMENTS))  # fmt: skip
            _run([str(python_of(tmp)), "-c", "from dashinfer import allspark"], "import dashinfer")
        except FtdError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / ".ready").write_text("\n".join(REQUIREMENTS) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    # venv scripts hold absolute paths; the interpreter itself is what we call, which is unaffected.
    return python_of(target)


def _run(command: list[str], what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise FtdError(f"could not {what} for DashInfer's environment ({env_dir()}): {tail}")


def run_worker(command: str, spec_path: Path, timeout: float = 1800) -> str:
    """Run the worker in DashInfer's environment; return its log. Raises FtdError with the log's tail."""
    python = ensure_env()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    proc = subprocess.run([str(python), str(WORKER), command, str(spec_path)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise FtdError(f"DashInfer {command} failed: " + " | ".join(log.strip().splitlines()[-6:]))
    return log
