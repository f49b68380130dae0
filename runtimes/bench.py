"""Latency and memory of one runner on one set of inputs; the one timing path of the toolkit.

Latency: wall-clock time of each `runner.run` call (perf_counter) after `warmup` untimed calls;
the median and the 90th percentile of `runs` calls, per call and per sample. Every latency the
project reports, in `compress run`'s report, `compress bench` and the benchmarks under bench/,
is timed by `time_calls` here: `benchmark` for one runner, `paired_benchmark` for several runners
in alternation, `paired_timing` for plain callables (a host loop in torch next to the artifacts).
`Stopwatch` times a stage once (an export, a fine-tune); it is not a latency figure.

Memory: resident set size (RSS) of this process, the memory the OS really holds for the
runtime, weights and activations included (tracemalloc would miss every native allocation of
onnxruntime, OpenVINO and torch). On Linux the kernel's peak-RSS counter (VmHWM) is reset
through /proc/self/clear_refs just before the runner loads, so the peak covers exactly load,
warm-up and timed runs; elsewhere a thread samples RSS every 2 ms with psutil. `peak_rss_delta_mb`
is that peak minus the RSS before loading: what running this artifact added to the process.
"""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes.runners import Runner

MB = 2**20


def processor_name() -> str:
    """The CPU's model name where Linux tells it (/proc/cpuinfo), else what `platform` knows ('x86_64')."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_calls(call: Callable[[], object], runs: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``call()`` (perf_counter), after ``warmup`` untimed calls."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


class Stopwatch:
    """Seconds one stage took, timed once: ``with Stopwatch() as clock: export(...)``, then ``clock.seconds``
    (while the block runs, the seconds so far)."""

    def __enter__(self) -> "Stopwatch":
        self._start, self._stop = time.perf_counter(), None
        return self

    def __exit__(self, *exc) -> None:
        self._stop = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self._stop if self._stop is not None else time.perf_counter()) - self._start


def benchmark(runner: Runner, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3, load: Callable[[], object] | None = None) -> dict:
    """Loads (``load()``, inside the memory window), warms up, then times ``runs`` calls of ``runner.run(feeds)``."""
    gc.collect()
    with PeakRSS() as memory:
        with Stopwatch() as loading:
            if load is not None:
                load()
        loaded = current_rss()
        times = time_calls(lambda: runner.run(feeds), runs, warmup)
    batch = int(next(iter(feeds.values())).shape[0])
    median = float(np.median(times))
    result = {
        "runtime": runner.name,
        "device": runner.device,
        "batch": batch,
        "runs": runs,
        "warmup": warmup,
        "threads": runner.threads,
        "latency_ms": {
            "median": median,
            "p90": float(np.percentile(times, 90)),
            "mean": float(np.mean(times)),
            "min": float(np.min(times)),
            "max": float(np.max(times)),
        },
        "ms_per_sample": median / batch,
        "samples_per_s": 1000 * batch / median,
        "load_s": loading.seconds,
        "memory": {**memory.result(), "rss_loaded_mb": loaded / MB if loaded is not None else None},
        "device_peak_mb": runner.peak_device_memory_mb(),
        "runner": runner.describe(),
    }
    return result


def paired_timing(calls: dict[str, Callable[[], object]], rounds: int = 5, runs: int = 20, warmup: int = 2, warmup_rounds: int = 0) -> dict[str, dict]:
    """Several callables timed in alternation, so that load on a shared machine hits them alike.

    First ``warmup_rounds`` untimed calls of each in turn; then ``rounds`` rounds, in each of which every
    callable in turn gets ``warmup`` untimed calls and ``runs`` timed ones (`time_calls`). Per callable:
    the median of the rounds' medians (``median_ms``), their spread, and the 90th percentile of all timed
    calls (``p90_ms``). With ``runs=1`` the calls themselves interleave and ``median_ms`` is their median.
    """
    for _ in range(warmup_rounds):
        for call in calls.values():
            call()
    medians: dict[str, list[float]] = {k: [] for k in calls}
    every: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            gc.collect()
            times = time_calls(call, runs, warmup)
            medians[name].append(float(np.median(times)))
            every[name] += times
    return {k: {"median_ms": float(np.median(v)), "min_round_ms": float(np.min(v)), "max_round_ms": float(np.max(v)),
                "p90_ms": float(np.percentile(every[k], 90)), "rounds": rounds, "runs": runs} for k, v in medians.items()}


def paired_benchmark(runners: dict[str, Runner], feeds: dict[str, np.ndarray], rounds: int = 5, runs: int = 20, warmup: int = 2) -> dict[str, dict]:
    """`paired_timing` of several loaded runners on the same inputs: per runner the median of the rounds'
    medians (and its spread). Ratios of these are what the benchmarks under bench/ report."""
    return paired_timing({k: (lambda runner=runner: runner.run(feeds)) for k, runner in runners.items()}, rounds, runs, warmup)


def current_rss() -> int | None:
    """Resident bytes of this process now (None where neither /proc nor psutil can tell)."""
    if Path("/proc/self/status").is_file():
        return _proc_status_kb("VmRSS") * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak RSS of this process between __enter__ and __exit__ (see the module docstring for how).

    Meters nest (a stage's peak around the benchmarks inside it): the kernel has one peak counter,
    so a meter that resets it first hands the peak so far to the meters around it, and its own peak
    when it ends."""

    _open: list["PeakRSS"] = []

    def __enter__(self) -> "PeakRSS":
        self.before = current_rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._sampler = None
        outer_peak = _kernel_peak()
        if _reset_kernel_peak():
            for outer in self._open:
                outer.peak = max(outer.peak, outer_peak or 0)
            self._open.append(self)
            self.method = "linux VmHWM, reset through /proc/self/clear_refs"
        elif self.before is not None:
            self.method = "psutil RSS sampled every 2 ms"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        else:
            self.method = "not measured: install psutil"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, current_rss())
        elif self.before is not None:
            self.peak = max(self.peak, _kernel_peak())
            self._open.remove(self)
            for outer in self._open:
                outer.peak = max(outer.peak, self.peak)

    def result(self) -> dict:
        measured = self.before is not None
        return {
            "method": self.method,
            "rss_before_mb": self.before / MB if measured else None,
            "peak_rss_mb": self.peak / MB if measured else None,
            "peak_rss_delta_mb": (self.peak - self.before) / MB if measured else None,
        }


def _kernel_peak() -> int | None:
    try:
        return _proc_status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        return None


def _reset_kernel_peak() -> bool:
    """Linux resets VmHWM (peak RSS) to the current RSS when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False
