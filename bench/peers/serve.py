"""The request loop every driver runs, in whichever virtual environment it lives.

bench/peers.py starts one driver per tool and keeps it alive, so that it can interleave the
tools call by call: it sends one JSON request a line on stdin and reads one reply a line on
stdout, marked with ``@@`` (libraries print to stdout too). Timing goes through the toolkit's
own `runtimes.bench.time_calls` (perf_counter around one prompt -> image call, after warm-up),
imported from the repository root: it needs numpy only, which every venv has.

A driver supplies ``load(name, folder, threads)`` returning a callable
``generate(prompts, noise) -> images [N, 3, H, W] float32 in [0, 1]``.
"""
from __future__ import annotations

import json
import resource
import sys
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtimes.bench import Stopwatch, time_calls  # noqa: E402

MARK = "@@ "


def reply(**fields) -> None:
    sys.stdout.write(MARK + json.dumps(fields) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def handle(load, loaded: dict, request: dict) -> dict:
    op = request["op"]
    if op == "load":
        with Stopwatch() as clock:
            loaded[request["name"]] = load(request["name"], request["folder"], request["threads"], request.get("options", {}))
        return {"load_s": clock.seconds}
    generate = loaded.get(request.get("name"))
    if op == "images":
        noise = np.load(request["noise"])
        images = np.concatenate([generate(request["prompts"][i : i + 32], noise[i : i + 32]) for i in range(0, len(noise), 32)])
        np.save(request["out"], images.astype(np.float32))
        return {"shape": list(images.shape)}
    if op == "time":
        noise = np.load(request["noise"])[:1]
        ms = time_calls(lambda: generate([request["prompt"]], noise), request["runs"], request["warmup"])
        return {"ms": ms}
    if op == "rss":
        return {"peak_rss_mb": peak_rss_mb()}
    raise ValueError(f"unknown op {op!r}")


def serve(load) -> None:
    loaded: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        try:
            reply(ok=True, **handle(load, loaded, request))
        except Exception as e:  # a peer that cannot do something is a row of the table, not a crash of the bench
            traceback.print_exc(file=sys.stderr)
            reply(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])


def folder_bytes(folder: str | Path, suffixes=(".onnx", ".onnx_data", ".data", ".xml", ".bin", ".json", ".txt", ".model")) -> int:
    """Bytes of a peer's exported files (its model graphs and weights, tokenizer and configs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in suffixes)
