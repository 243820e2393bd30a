"""What a benchmark ran on, printed with its figures so that runs on different CPU kinds (this
workplace alternates AMD Zen and Intel Sapphire Rapids) are never confused."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it where there is one, with its family and
    model numbers: a virtual machine may call every generation just "AMD EPYC" (family 25 is
    Zen 3/4, 26 Zen 5)."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
                    f"model {fields.get('model', '?')})")
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
