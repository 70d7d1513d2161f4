"""Sample the resource usage of this process for heartbeats (psutil, NVML if present)."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

__all__ = ["ResourceSampler"]


class ResourceSampler:
    """CPU, memory, disk and GPU usage; each part is None when its library is missing."""

    def __init__(self, disk_path: str = ".") -> None:
        self._disk_path = disk_path
        try:
            import psutil  # noqa: PLC0415 - optional dependency

            self._process: Any = psutil.Process(os.getpid())
            self._process.cpu_percent(None)  # primes the counter
        except ImportError:
            self._process = None
        self._cpu_count = os.cpu_count() or 1
        self._nvml: Any = None
        try:
            import pynvml  # noqa: PLC0415 - optional dependency

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # no library, no driver or no GPU: no GPU metrics
            self._nvml = None

    def sample(self, service: str, instance: str) -> dict[str, Any]:
        """A ``ResourceHeartbeat`` record for now."""
        cpu = memory = None
        if self._process is not None:
            cpu = min(1.0, self._process.cpu_percent(None) / 100.0 / self._cpu_count)
            memory = int(self._process.memory_info().rss)
        usage = shutil.disk_usage(self._disk_path)
        gpus = []
        if self._nvml is not None:
            nvml = self._nvml
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(
                    {
                        "index": index,
                        "utilization_ratio": util.gpu / 100.0,
                        "memory_used_bytes": int(mem.used),
                    }
                )
        return {
            "event_time_ms": int(time.time() * 1000),
            "service": service,
            "instance": instance,
            "cpu_usage_ratio": cpu,
            "memory_usage_bytes": memory,
            "disk_usage_ratio": usage.used / usage.total if usage.total else None,
            "gpus": gpus,
        }
