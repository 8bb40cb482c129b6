"""The machine a benchmark ran on, as the benchmarks' results files record it (one copy, shared
by ``quality.py`` and ``speed.py``)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_details() -> dict:
    """CPU, cores, memory, platform, Python, and the load average when the benchmark starts (the
    machine may be shared with other jobs)."""
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": load}


def machine() -> str:
    """One line: ``"<cores> cores, <CPU model>"``."""
    return f"{os.cpu_count()} cores, {cpu_model()}"
