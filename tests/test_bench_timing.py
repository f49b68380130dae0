"""runtimes/bench.py, the one timing path: `time_calls` under `benchmark`, `paired_timing` under
`paired_benchmark`, and that no benchmark under bench/ keeps a latency loop of its own (issue 17)."""
from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from runtimes.bench import Stopwatch, benchmark, paired_benchmark, paired_timing, time_calls
from runtimes.runners import Runner

ROOT = Path(__file__).resolve().parents[1]


class CountingRunner(Runner):
    """A runner that sleeps `seconds` per call and logs its calls: timing without any real library."""

    def __init__(self, name: str, seconds: float, log: list):
        super().__init__(threads=1)
        self.name, self.device, self.formats = name, "cpu", ("onnx",)
        self.seconds, self.log = seconds, log

    def available(self):
        return True, "always"

    def load(self, artifact_path):
        return self

    def run(self, inputs):
        self.log.append(self.name)
        time.sleep(self.seconds)
        return inputs["noise"]


def test_time_calls_counts_warmup_and_runs():
    calls = []
    times = time_calls(lambda: calls.append(1), runs=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="at least 1"):
        time_calls(lambda: None, runs=0)


def test_paired_timing_alternates_and_orders_by_cost():
    log = []
    calls = {"slow": lambda: (log.append("slow"), time.sleep(0.03)), "fast": lambda: (log.append("fast"), time.sleep(0.001))}
    result = paired_timing(calls, rounds=3, runs=1, warmup=0, warmup_rounds=2)
    assert log == ["slow", "fast"] * 5  # two untimed rounds, then three timed ones, interleaved call by call
    assert result["slow"]["median_ms"] > result["fast"]["median_ms"] >= 1.0
    for r in result.values():
        assert r["rounds"] == 3 and r["runs"] == 1
        assert r["min_round_ms"] <= r["median_ms"] <= r["max_round_ms"] and r["p90_ms"] >= r["min_round_ms"]


def test_paired_benchmark_is_paired_timing_over_runners():
    log = []
    runners = {"a": CountingRunner("a", 0.001, log), "b": CountingRunner("b", 0.001, log)}
    feeds = {"noise": np.zeros((1, 1, 2, 2), np.float32)}
    result = paired_benchmark(runners, feeds, rounds=2, runs=3, warmup=1)
    assert log == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4  # per round and runner: 1 warm-up + 3 timed calls
    assert set(result) == {"a", "b"}
    assert set(result["a"]) >= {"median_ms", "min_round_ms", "max_round_ms", "rounds", "runs"}  # what bench/ reads


def test_benchmark_times_through_time_calls():
    log = []
    runner = CountingRunner("a", 0.002, log)
    result = benchmark(runner, {"noise": np.zeros((2, 1, 2, 2), np.float32)}, runs=3, warmup=2, load=lambda: runner.load("x"))
    assert len(log) == 5 and result["runs"] == 3 and result["batch"] == 2
    assert result["latency_ms"]["min"] >= 2.0 and result["load_s"] >= 0
    assert result["ms_per_sample"] == pytest.approx(result["latency_ms"]["median"] / 2)


def test_stopwatch():
    with Stopwatch() as clock:
        time.sleep(0.01)
        assert clock.seconds > 0
    done = clock.seconds
    time.sleep(0.005)
    assert clock.seconds == done >= 0.01


CLOCKS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns"}


def _reads_clock(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            if isinstance(f, ast.Attribute) and f.attr in CLOCKS and isinstance(f.value, ast.Name) and f.value.id == "time":
                return True
            if isinstance(f, ast.Name) and f.id in CLOCKS - {"time"}:
                return True
    return False


def _repeats(node: ast.AST) -> bool:
    """A loop that repeats a call: `while`, or `for ... in range(...)` (a loop over configurations is not one)."""
    if isinstance(node, ast.While):
        return True
    it = node.iter if isinstance(node, (ast.For, ast.comprehension)) else None
    return isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"


def test_no_benchmark_keeps_a_timing_loop_of_its_own():
    """Every latency under bench/ comes from runtimes/bench.py; a stage timed once (an export, a fine-tune) is allowed."""
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.For, ast.While, ast.comprehension)) and _repeats(node) and _reads_clock(node):
                offenders.append(f"{path.name}:{getattr(node, 'lineno', '?')}")
    assert not offenders, f"latency loops outside runtimes/bench.py: {offenders}"


def test_nested_memory_meters_keep_the_outer_peak():
    """A stage's meter around a benchmark's meter: the inner reset of the kernel's counter must not lose the outer peak."""
    import numpy as np

    from runtimes.bench import PeakRSS

    with PeakRSS() as outer:
        before_inner = np.ones(64 * 2**20 // 8)  # 64 MiB touched and freed before the inner meter starts
        del before_inner
        with PeakRSS() as inner:
            during = np.ones(32 * 2**20 // 8)
            del during
    grown_outer = outer.result()["peak_rss_delta_mb"]
    grown_inner = inner.result()["peak_rss_delta_mb"]
    assert grown_outer >= 60 and 28 <= grown_inner < 60
