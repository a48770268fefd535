"""What every timing harness measures with: one device sync, one stopwatch, one ABBA interleaving with
medians, one peak-memory probe, one description of the machine, one markdown table writer.

A GPU runs kernels asynchronously, so a wall clock read without synchronising measures the launch, not the
work; every harness therefore times through :class:`Stopwatch`. Two sides compared in one process share
background load and cache effects only if neither always runs first: :func:`interleaved` alternates them
in ABBA order (A B, B A, A B, ...), and :func:`time_interleaved` reports each side's median.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA), so a clock read after it sees that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall seconds spent in a ``with`` block (``.seconds``), the device synchronised on entry and exit so
    that work queued before the block is not counted and work queued inside it is."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def abba(names: Sequence[str], rounds: int) -> Iterator[str]:
    """``names`` in order on even rounds and reversed on odd ones, ``rounds`` times: A B, B A, A B, ..."""
    for r in range(rounds):
        yield from (names if r % 2 == 0 else names[::-1])


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each function called ``rounds`` times in :func:`abba` order; the values each returned, in order."""
    values: dict[str, list[float]] = {name: [] for name in fns}
    for name in abba(list(fns), rounds):
        values[name].append(fns[name]())
    return values


def medians(values: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list."""
    return {name: statistics.median(v) for name, v in values.items()}


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function over ``iters`` calls after ``warmup`` untimed calls of each,
    the calls interleaved (:func:`interleaved`) so that a load spike or a warm cache does not systematically
    favour the one that runs first."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters}, warmup={warmup}: expected iters >= 1 and warmup >= 0")
    for _ in range(warmup):
        for fn in fns.values():
            fn()

    def timed(fn: Callable[[], object]) -> float:
        with Stopwatch(device) as watch:
            fn()
        return watch.seconds

    return medians(interleaved({name: (lambda fn=fn: timed(fn)) for name, fn in fns.items()}, iters))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak growth of the process's resident memory while the block runs, in bytes (``.growth``).

    A thread samples ``/proc/self/statm`` every ``interval`` seconds. What it measures: memory the
    allocator took from the OS during the block beyond what the process held at its start (activations,
    gradients, optimizer state first touched, allocator slack); memory freed earlier and reused inside
    the block does not count. ``malloc_trim`` first returns freed heap to the OS so that one model's
    leftovers do not hide the other's peak. Linux only; ``growth`` is -1 where /proc is missing.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.growth = -1
        self._stop = threading.Event()

    def _poll(self, start: int) -> None:
        peak = start
        while not self._stop.is_set():
            peak = max(peak, _rss_bytes())
            self._stop.wait(self.interval)
        self.growth = max(peak, _rss_bytes()) - start

    def __enter__(self) -> PeakRSS:
        if not os.path.exists("/proc/self/statm"):
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._thread = threading.Thread(target=self._poll, args=(_rss_bytes(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` in MiB: CUDA max_memory_allocated, or on CPU peak RSS growth."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with PeakRSS() as peak:
        fn()
    return peak.growth / 2**20


def machine() -> str:
    """One line naming the machine: CPU model, cores, torch version and threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def load_average() -> str:
    """The 1/5/15-minute load averages, to judge how much others used the machine meanwhile."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown table: the ``header`` row, the rule, one line per row (cells as ``str`` gives them).

    align: one character per column, ``l`` (``---``) or ``r`` (``---:``); columns it does not reach are
    ``l``. Raises ValueError for a row whose length is not the header's, or an unknown alignment.
    """
    if set(align) - {"l", "r"} or len(align) > len(header):
        raise ValueError(f"align {align!r}: expected at most {len(header)} of 'l' and 'r'")
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = [header, rule]
    for k, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table row {k}: {len(row)} cells for {len(header)} columns ({list(header)})")
        lines.append(row)
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)
