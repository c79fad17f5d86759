"""The machine record every bench JSON carries (issue 18 item 6): CPU model and the flags that decide the
dtype, torch version and threads, the dtype the figures were taken in, and the load on the (shared) box.

Usage: `report["machine"] = machine_record(dtype="bfloat16")`.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from service.inference.cpu import choose_dtype, cpu_info


def machine_record(dtype: str | None = None) -> dict[str, object]:
    info = cpu_info()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = ""
    return {
        "cpu_model": info.model,
        "cpu_flags": info.flags(),  # amx_bf16 / avx512_bf16 / avx2
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype,  # the dtype the figures were taken in
        "dtype_auto": choose_dtype("auto", torch.device("cpu")).name,  # what OPPU_DTYPE=auto picks here
        "load_avg": [round(x, 2) for x in os.getloadavg()],  # 1/5/15 min: other processes share the cores
        "uptime": uptime,
    }
