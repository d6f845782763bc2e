"""Tools run through BuildLog: in this process (`python -m` entry points, e.g. the og builder on
CPU) they behave like the subprocess: same output lines, same failures, nothing left changed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ftd.errors import FtdError
from tasks.logged_command import BuildLog


@pytest.mark.parametrize("in_process", [False, True])
def test_output_lines_reach_the_callback_and_the_log(tmp_path: Path, in_process: bool) -> None:
    source = tmp_path / "in.json"
    source.write_text('{"b": 1, "a": [1, 2]}')
    seen: list[str] = []
    argv = list(sys.argv)
    command = [sys.executable, "-m", "json.tool", "--sort-keys", str(source)]
    BuildLog(tmp_path / "build.log").run(command, "format", on_line=seen.append, in_process=in_process)
    assert seen[:2] == ["{", '    "a": [']
    assert '"b": 1' in (tmp_path / "build.log").read_text()
    assert sys.argv == argv


@pytest.mark.parametrize("in_process", [False, True])
def test_a_failing_tool_raises_with_its_last_lines(tmp_path: Path, in_process: bool) -> None:
    source = tmp_path / "bad.json"
    source.write_text("{not json")
    command = [sys.executable, "-m", "json.tool", str(source)]
    with pytest.raises(FtdError, match=r"format failed: .*Expecting property name"):
        BuildLog(tmp_path / "build.log").run(command, "format", in_process=in_process)


def test_carriage_return_updates_count_as_lines(tmp_path: Path) -> None:
    script = tmp_path / "ticks.py"
    script.write_text("import sys\nfor i in range(3):\n    sys.stderr.write(f'\\r{i}/3')\nprint()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        seen: list[str] = []
        BuildLog(tmp_path / "build.log").run([sys.executable, "-m", "ticks"], "ticks", seen.append, in_process=True)
    finally:
        sys.path.remove(str(tmp_path))
    assert [s for s in seen if s] == ["0/3", "1/3", "2/3"]


def test_a_stop_request_ends_the_tool_instead_of_waiting_for_it(tmp_path: Path) -> None:
    """A SIGTERM (Prefect raises TerminationSignal) while a tool runs: the tool is stopped at once;
    without that, leaving `with Popen(...)` waits for a torchrun or a CUDA build to finish."""
    import time

    from prefect.exceptions import TerminationSignal

    pid_file = tmp_path / "pid"
    script = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
              "print('started', flush=True); time.sleep(120)")  # fmt: skip

    def stop_on_first_line(line: str) -> None:
        raise TerminationSignal(signal=15)

    started = time.monotonic()
    with pytest.raises(TerminationSignal):
        BuildLog(tmp_path / "build.log").run([sys.executable, "-c", script], "sleep", on_line=stop_on_first_line)
    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the tool still runs (or was never reaped)"
