"""``posttrain train --num-processes N [--distributed ...]``: start accelerate from posttrain itself.

The recipe is checked here first (one ``error:`` line and exit 2 on bad input, before any process starts); then the
same ``posttrain train`` command runs under ``accelerate launch`` with the chosen backend's flags, and its exit code
is returned. A launch that is already distributed (``WORLD_SIZE`` > 1 in the environment, e.g. from ``accelerate
launch`` or ``torchrun``) runs in place. docs/distributed.md says which backend to pick.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from posttrain.errors import UserError

# backend -> accelerate launch flags (accelerate's own names; every other setting stays at accelerate's default)
BACKENDS: dict[str, list[str]] = {
    "ddp": ["--multi_gpu"],  # with no GPU visible the processes train on CPU with gloo
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"],
    "zero3_offload": ["--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true",
                      "--zero3_save_16bit_model", "true", "--offload_optimizer_device", "cpu",
                      "--offload_param_device", "cpu"],
    "fsdp2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
              "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true"],
}
NEEDS = {"zero2": "deepspeed", "zero3": "deepspeed", "zero3_offload": "deepspeed"}


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
            raise UserError(f"--distributed {backend}: one process has nothing to distribute; use --num-processes "
                            ">= 2 (a one-process DeepSpeed/FSDP run: accelerate launch --config_file "
                            f"configs/{backend}.yaml --num_processes 1 -m posttrain.cli train RECIPE)")
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


def run_launch(num_processes: int, backend: str, argv: list[str]) -> int:
    """Start the launch and wait for it; its exit code (a failing rank makes accelerate exit non-zero)."""
    cmd = launch_command(num_processes, backend, train_argv_without_launch_flags(argv))
    print(f"[posttrain] launching {num_processes} processes ({backend}): accelerate launch "
          + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode
