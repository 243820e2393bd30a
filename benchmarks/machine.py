"""What a benchmark ran on, printed with its figures so that runs on different CPU kinds (this
workplace alternates AMD Zen and Intel Sapphire Rapids) are never confused."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_isa() -> str:
    """The instruction set our CPU kernels run, or "reference" (the PyTorch path)."""
    from sketchtune import kernels

    return kernels.current_path()


def machine_line() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU {cpu_model()} ({os.cpu_count()} cores), kernels {kernel_isa()}, "
            f"torch threads {torch.get_num_threads()}, load average {load}")
