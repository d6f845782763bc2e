"""Run a tool the way every stage does: offline (local paths only), its output appended to a log
file kept with the artifact, each line handed to a callback as it comes (progress), and a failure
reported with the output's last lines.

A tool is a command line. Most run as a subprocess. A `python -m MODULE ...` command can also run
in this process (`in_process=True`): the same entry point and arguments, executed with `runpy`,
which saves the child's interpreter start and its imports of torch and transformers (~5 s of a
~6 s build of the tiny default; the flow has imported them already). One in-process tool runs at
a time, since `sys.argv` and the standard streams are global to the process."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import runpy
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from ftd.errors import FtdError

_ONE_IN_PROCESS_TOOL = threading.Lock()


class BuildLog:
    """Runs the build's tools offline (local paths only), appending their output to build.log
    and handing each output line to `on_line` (progress) as it comes."""

    def __init__(self, path: Path):
        self.path = path

    def run(self, command: list[str], what: str, on_line=None, in_process: bool = False) -> float:
        started = time.perf_counter()
        if in_process:
            code, lines = _run_module_here(command, on_line)
        else:
            code, lines = _run_subprocess(command, on_line)
        seconds = time.perf_counter() - started
        with self.path.open("a") as log:
            log.write(f"$ {' '.join(command)}{'  # in process' if in_process else ''}\n{''.join(lines)}\n")
        if code != 0:
            tail = "".join(lines).strip().splitlines()[-5:]
            raise FtdError(f"{what} failed: " + " | ".join(tail))
        return seconds


def _run_subprocess(command: list[str], on_line) -> tuple[int, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    lines: list[str] = []
    # Universal newlines: tqdm's carriage-return updates arrive as lines too.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
        except BaseException:  # a stop request (or an error here): the tool must not outlive the run,
            _stop(proc)  # and Popen's exit would otherwise wait for it to finish
            raise
    return proc.returncode, lines


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM first, so a launcher (torchrun) can stop its workers; SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()


class _LineSplitter:
    """A text stream that hands each complete line (ended by \\n or tqdm's \\r) to a callback."""

    def __init__(self, lines: list[str], on_line):
        self.lines, self.on_line, self.pending = lines, on_line, ""

    def write(self, text: str) -> int:
        self.pending += text
        *complete, self.pending = re.split(r"\r\n|\r|\n", self.pending)
        for line in complete:
            self.lines.append(line + "\n")
            if self.on_line is not None:
                self.on_line(line)
        return len(text)

    def flush(self) -> None:
        pass

    def close_pending(self) -> None:
        if self.pending:
            self.write("\n")

    def isatty(self) -> bool:
        return False

    def __enter__(self):  # tools may use `with sys.stdout as out:`; the stream stays open
        return self

    def __exit__(self, *exc) -> None:
        pass


def _run_module_here(command: list[str], on_line) -> tuple[int, list[str]]:
    """`python -m MODULE ARGS` executed in this process: exit code and output lines."""
    if command[:2] != [sys.executable, "-m"]:
        raise ValueError(f"only `python -m MODULE ...` commands can run in process, not {command[:3]}")
    module, args = command[2], command[3:]
    lines: list[str] = []
    stream = _LineSplitter(lines, on_line)
    with _ONE_IN_PROCESS_TOOL, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        saved_argv, sys.argv = sys.argv, [module, *args]
        try:
            with warnings.catch_warnings():  # runpy warns when the module was imported before
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(module, run_name="__main__")
            code = 0
        except SystemExit as exc:  # as the interpreter would: a message is printed, exit code 1
            if exc.code is not None and not isinstance(exc.code, int):
                stream.write(f"{exc.code}\n")
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:  # the tool's own error: reported like a failed subprocess
            stream.write(traceback.format_exc())
            code = 1
        finally:
            sys.argv = saved_argv
            stream.close_pending()
    gc.collect()  # the tool's model and graph: released now, not whenever the collector runs
    return code, lines
