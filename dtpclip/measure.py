"""Wall-clock and peak-memory measurement of a step, on GPU or CPU.

GPU: CUDA's own peak allocator statistics. CPU: no allocator statistics exist, so the peak
resident set is read from Linux's /proc (VmHWM, reset through clear_refs), with glibc told to
hand large buffers straight back to the OS so that RSS follows what tensors hold.
"""
import contextlib
import ctypes
import gc
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def default_device() -> str:
    """'cuda' when a GPU is there, else 'cpu': the entry points' --device default."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name ('fp32' | 'bf16' | 'fp16') on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(steps: Dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
                             repeats: int = 5) -> Dict[str, float]:
    """Median seconds of each step, timed round-robin: on a shared machine, load that comes and goes
    hits every step alike instead of whichever happened to run during it."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _cpu_peak_bytes(step: Callable[[], object]) -> Optional[int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)  # buffers >= 64 KiB are mmapped and unmapped on free
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _proc_kib("VmRSS")
        step()
        return (_proc_kib("VmHWM") - base) * 1024
    except OSError:  # not Linux/glibc: no honest CPU measure
        return None


def peak_resident_bytes() -> Optional[int]:
    """This process's peak resident set so far (Linux), for logs on CPU runs."""
    try:
        return _proc_kib("VmHWM") * 1024
    except OSError:
        return None


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory `step` needs above what was held before it (None where it can't be measured)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(step)
