"""`compress bench`: latency (median, p90) and peak memory of an exported artifact on one or more runtimes."""
from __future__ import annotations

import gc
import json
import sys

import click

from compress.errors import UserError


@click.command()
@click.argument("artifact", required=False, type=click.Path())
@click.option("--runtime", "runtimes", multiple=True,
              help="torch, onnxruntime[-cuda|-tensorrt|-qnn|-coreml], openvino[-bf16|-gpu|-npu], coreml[-cpu]; repeatable. "
                   "Default: the artifact format's own runtime.")
@click.option("--batch", type=int, default=None, help="Batch size (default: the artifact's fixed batch, else 1).")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed calls.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls before timing.")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every runtime (default: each library's own).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the input noise.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--list-runtimes", is_flag=True, help="List every runtime name, whether it runs here and why (not).")
def bench(artifact, runtimes, batch, runs, warmup, threads, seed, as_json, list_runtimes):
    """Time ARTIFACT (sampler.onnx, sampler.xml, sampler.mlpackage, ...) on each --runtime."""
    from runtimes.runners import availability

    _check_counts(batch, runs, warmup, threads)
    if list_runtimes:
        rows = availability(threads)
        click.echo(json.dumps(rows, indent=2) if as_json else _availability_table(rows))
        return
    if not artifact:
        raise UserError("missing ARTIFACT (a sampler.onnx, sampler.xml or sampler.mlpackage); or pass --list-runtimes")
    report = run_bench(artifact, list(runtimes), batch, runs, warmup, threads, seed)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _check_counts(batch, runs, warmup, threads) -> None:
    for flag, value, least in (("--batch", batch, 1), ("--runs", runs, 1), ("--warmup", warmup, 0), ("--threads", threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")


def run_bench(path: str, runtime_names: list[str], batch: int | None, runs: int, warmup: int, threads: int | None, seed: int) -> dict:
    """Every runner is checked (name, availability, format) before the first one is timed."""
    from runtimes.artifacts import example_feeds, open_artifact
    from runtimes.bench import benchmark
    from runtimes.runners import DEFAULT_RUNTIME, get_runner

    artifact = open_artifact(path)
    runners = [get_runner(name, threads) for name in (runtime_names or [DEFAULT_RUNTIME[artifact.format]])]
    for runner in runners:
        runner.require_available()
        runner.open_artifact(artifact.path)  # refuses a format the runtime cannot read
    feeds = example_feeds(artifact, batch, seed)
    results, reference, compare = [], None, len(runners) > 1
    while runners:
        runner = runners.pop(0)  # out of the list, so that its model is freed before the next runtime loads
        result = benchmark(runner, feeds, runs, warmup, load=lambda: runner.load(artifact.path))
        if compare:  # the same inputs on every runtime: report how far each lands from the first
            output = runner.run(feeds)
            reference = output if reference is None else reference
            result["max_abs_diff_vs_first"] = float(abs(output - reference).max())
        results.append(result)
        runner = None
        gc.collect()
    return {
        "artifact": {"path": str(artifact.path), "format": artifact.format, "kind": artifact.kind,
                     "inputs": {name: list(value.shape) for name, value in feeds.items()}},
        "seed": seed,
        "results": results,
    }


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    art = report["artifact"]
    table = Table(title=f"{art['path']} ({art['format']} {art['kind']})")
    columns = ["runtime", "device", "batch", "median ms", "p90 ms", "ms/sample", "peak RSS +MB", "load s"]
    compare = any("max_abs_diff_vs_first" in r for r in report["results"])
    for column in columns + (["max |diff| vs first"] if compare else []):
        table.add_column(column, justify="left" if column in ("runtime", "device") else "right", no_wrap=True)
    for r in report["results"]:
        cells = [r["runtime"], str(r["device"]), str(r["batch"]), f"{r['latency_ms']['median']:.2f}", f"{r['latency_ms']['p90']:.2f}",
                 f"{r['ms_per_sample']:.2f}", _mb(r["memory"]["peak_rss_delta_mb"]), f"{r['load_s']:.2f}"]
        if compare:
            cells.append(f"{r['max_abs_diff_vs_first']:.2e}")
        table.add_row(*cells)
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped output: no 80-column squeeze
    console.print(table)
    console.print(f"{report['results'][0]['runs']} timed runs after {report['results'][0]['warmup']} warm-up; "
                  f"memory: {report['results'][0]['memory']['method']}")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _availability_table(rows: list[dict]) -> str:
    width = max(len(r["runtime"]) for r in rows)
    return "\n".join(f"{r['runtime']:<{width}}  {'yes' if r['available'] else 'no ':<3}  {r['reason']}" for r in rows)
