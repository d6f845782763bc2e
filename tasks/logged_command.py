"""Run a tool as a subprocess the way every stage does: offline (local paths only), its output
appended to a log file kept with the artifact, each line handed to a callback as it comes
(progress), and a failure reported with the output's last lines."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ftd.errors import FtdError


class BuildLog:
    """Runs the build's subprocesses offline (local paths only), appending their output to build.log
    and handing each output line to `on_line` (progress) as it comes."""

    def __init__(self, path: Path):
        self.path = path

    def run(self, command: list[str], what: str, on_line=None) -> float:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        started = time.perf_counter()
        lines: list[str] = []
        # Universal newlines: tqdm's carriage-return updates arrive as lines too.
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
        seconds = time.perf_counter() - started
        with self.path.open("a") as log:
            log.write(f"$ {' '.join(command)}\n{''.join(lines)}\n")
        if proc.returncode != 0:
            tail = "".join(lines).strip().splitlines()[-5:]
            raise FtdError(f"{what} failed: " + " | ".join(tail))
        return seconds
