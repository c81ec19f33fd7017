"""What ``posttrain train`` does to start and end quickly (issue 29; the seconds are measured by
benchmarks/startup.py, not here): no DeepSpeed import in a run that uses none, and the end of the process without the
interpreter's teardown once the exit handlers ran."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_unwrapping_a_model_imports_no_deepspeed_until_deepspeed_is_imported():
    code = (
        "import sys, torch\n"
        "from accelerate.utils import extract_model_from_parallel\n"
        "import accelerate.utils.other as other\n"
        "from posttrain.distributed import skip_deepspeed_until_imported\n"
        "skip_deepspeed_until_imported(); skip_deepspeed_until_imported()\n"
        "model = torch.nn.Linear(2, 2)\n"
        "assert extract_model_from_parallel(model) is model\n"
        "print('deepspeed' in sys.modules, other.is_deepspeed_available())\n"
        "import deepspeed\n"
        "assert extract_model_from_parallel(model) is model\n"
        "print(other.is_deepspeed_available())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()  # DeepSpeed's own log lines go to stdout too
    assert lines[0] == "False False" and lines[-1] == "True", proc.stdout


def test_end_process_runs_the_exit_handlers_flushes_and_keeps_the_code():
    code = (
        "import atexit, sys\n"
        "from posttrain.cli import end_process\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "print('last line', end='')\n"
        "sys.stderr.write('on stderr')\n"
        "end_process(3)\n"
        "print('not reached')\n"
    )
    proc = _python(code)
    assert proc.returncode == 3
    assert proc.stdout == "last linehandler ran\n" and proc.stderr == "on stderr"


def test_end_process_waits_for_a_thread_that_is_not_a_daemon():
    code = (
        "import threading, time\n"
        "from posttrain.cli import end_process\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished'))).start()\n"
        "end_process(0)\n"
        "print('ordinary exit')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0
    assert proc.stdout.split("\n")[:2] == ["ordinary exit", "thread finished"], proc.stdout
