"""Shared by the benchmarks: a description of the machine a result came from."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch


def machine() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in f
                                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
