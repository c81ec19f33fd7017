"""``posttrain train --num-processes N [--distributed ...]``: start accelerate from posttrain itself.

The recipe is checked here first (one ``error:`` line and exit 2 on bad input, before any process starts); then the
same ``posttrain train`` command runs under ``accelerate launch`` with the chosen backend's flags, and its exit code
is returned. A launch that is already distributed (``WORLD_SIZE`` > 1 in the environment, e.g. from ``accelerate
launch`` or ``torchrun``) runs in place. docs/distributed.md says which backend to pick.

When a process fails with an error of the user's (or of the machine: a full disk, ...), it records its ``error:`` line
in a folder this launch owns (``POSTTRAIN_ERROR_DIR``) and exits at once; the other processes then fail in their next
collective (or are stopped by the launcher), and their output from then on (collective errors, the launcher's
summary) is held back: the launch ends with the failed process's own ``error:`` line and exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from posttrain.errors import UserError

# backend -> accelerate launch flags (accelerate's own names; every other setting stays at accelerate's default)
BACKENDS: dict[str, list[str]] = {
    "ddp": ["--multi_gpu"],  # with no GPU visible the processes train on CPU with gloo
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero2_offload": ["--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"],
    "zero3_offload": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true",
                      "--zero3_save_16bit_model", "true", "--offload_optimizer_device", "cpu",
                      "--offload_param_device", "cpu"],
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "false"],
}
NEEDS = {"zero2": "deepspeed", "zero2_offload": "deepspeed", "zero3": "deepspeed", "zero3_offload": "deepspeed"}


def already_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_launch_flags(num_processes: int | None, backend: str | None) -> int:
    """``posttrain train --num-processes N --distributed X``, checked before anything else happens (one error line):
    N >= 1; ``--distributed`` only with ``--num-processes`` N >= 2; the backend's package installed. Returns N
    (1 when not given)."""
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num_processes}")
    if backend is not None:
        if backend not in BACKENDS:
            raise UserError(f"--distributed: unknown '{backend}'; choose one of {', '.join(BACKENDS)}")
        if num_processes is None:
            raise UserError(f"--distributed {backend}: give --num-processes N as well (the processes to launch, e.g. "
                            "one per GPU); without it the run would train in this one process")
        if num_processes == 1:
            config = f"configs/{backend if backend in ('ddp', 'fsdp2') else 'deepspeed_' + backend}.yaml"
            raise UserError(f"--distributed {backend}: one process has nothing to distribute; use --num-processes "
                            ">= 2 (a one-process DeepSpeed/FSDP run: accelerate launch --config_file "
                            f"{config} --num_processes 1 -m posttrain.cli train RECIPE)")
        _check_backend_installed(backend)
    return 1 if num_processes is None else num_processes


def _check_backend_installed(backend: str) -> None:
    module = NEEDS.get(backend)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise UserError(f"--distributed {backend}: needs {module} (pip install -e '.[{module}]')")


def launch_command(num_processes: int, backend: str, train_argv: list[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``posttrain train <train_argv>`` on ``num_processes`` processes."""
    if num_processes < 1:
        raise UserError(f"--num-processes: must be >= 1, got {num_processes}")
    if backend not in BACKENDS:
        raise UserError(f"--distributed: unknown '{backend}'; choose one of {', '.join(BACKENDS)}")
    _check_backend_installed(backend)
    return [
        sys.executable, "-m", "accelerate.commands.launch", *BACKENDS[backend],
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(port if port is not None else free_port()),
        "-m", "posttrain.cli", "train", *train_argv,
    ]


def train_argv_without_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` of ``posttrain train ...`` minus ``--num-processes N`` and ``--distributed X`` (both spellings)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--num-processes", "--distributed"):
            skip = True
            continue
        if arg.startswith(("--num-processes=", "--distributed=")):
            continue
        out.append(arg)
    return out


ERROR_DIR = "POSTTRAIN_ERROR_DIR"


def record_error(line: str, exit_code: int) -> bool:
    """In a process started by :func:`run_launch`: record this process's ``error:`` line for the launch to show;
    returns whether there was a launch to record it for."""
    folder = os.environ.get(ERROR_DIR)
    if not folder or not os.path.isdir(folder):
        return False
    rank = int(os.environ.get("RANK", "0"))
    tmp = os.path.join(folder, f".rank{rank}.tmp")
    with open(tmp, "w") as fh:
        json.dump({"rank": rank, "line": line, "exit_code": exit_code}, fh)
    os.replace(tmp, os.path.join(folder, f"rank{rank}.json"))
    return True


def another_process_failed() -> bool:
    """In a process started by :func:`run_launch`: whether another process has already recorded its error (this
    process's own failure is then the consequence, e.g. a collective whose peer exited)."""
    folder = os.environ.get(ERROR_DIR)
    mine = f"rank{os.environ.get('RANK', '0')}.json"
    return bool(folder) and os.path.isdir(folder) and any(
        name.endswith(".json") and name != mine for name in os.listdir(folder))


def exit_launched_process(code: int) -> None:
    """End a launched process now, without the interpreter's teardown (which can wait on collectives whose peers
    are gone): the launcher sees the exit at once and stops the others."""
    if os.environ.get(ERROR_DIR):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _recorded_errors(folder: str) -> list[dict]:
    errors = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as fh:
                errors.append(json.load(fh))
    return sorted(errors, key=lambda e: e["rank"])


def run_launch(num_processes: int, backend: str, argv: list[str]) -> int:
    """Start the launch and wait for it; its exit code. A process's recorded error (see the module docstring) ends the
    launch's output as its last line, with that process's exit code (2 for a user error)."""
    cmd = launch_command(num_processes, backend, train_argv_without_launch_flags(argv))
    print(f"[posttrain] launching {num_processes} processes ({backend}): accelerate launch "
          + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="posttrain-launch-") as folder:
        proc = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR: folder}, stderr=subprocess.PIPE)
        held: list[bytes] = []
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        line_open = False  # the last chunk shown did not end a line (a progress bar)
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if held or any(name.endswith(".json") for name in os.listdir(folder)):
                held.append(chunk)  # after a process's error: the others' collateral output
                continue
            if out is not None:
                out.write(chunk)
                out.flush()
            else:  # pragma: no cover - a stderr without a byte buffer (captured in-process)
                sys.stderr.write(chunk.decode(errors="replace"))
            line_open = not chunk.endswith(b"\n")
        code = proc.wait()
        errors = _recorded_errors(folder)
    if code != 0 and errors:
        print(("\n" if line_open else "") + errors[0]["line"], file=sys.stderr, flush=True)
        return int(errors[0]["exit_code"]) or code
    for chunk in held:  # nothing recorded (a bug's traceback, or success): show everything
        sys.stderr.write(chunk.decode(errors="replace"))
    return code
