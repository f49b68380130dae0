"""The tools users would pick instead, side by side with ours on the same diffusers folder.

Peers (each in its own virtual environment, made by bench/peers/setup.sh, so that their pins never
touch ours):
- Optimum ONNX: `optimum-cli export onnx --task text-to-image`, run by its ONNX Runtime diffusion
  pipeline (the scheduler loop in Python on the host);
- optimum-intel + OpenVINO GenAI: `optimum-cli export openvino --task text-to-image` in float32
  and with int8 weights, and hybrid W8A8 (optimum-intel's `quant_method="hybrid"`, our prompts as
  its dataset), run by `openvino_genai.Text2ImagePipeline` (the loop in C++, static batch-1 shapes).
Ours: the float32 export and our W8A8 (recipes/digits-t2i.yaml's schemes) of the same folder, the
solver and decoder baked into sampler.onnx, prompt -> image through runtimes/text_to_image.py, on
onnxruntime and on OpenVINO.

Everything runs the same prompts from the same latent noise (every peer takes it: Optimum as
``latents=``, GenAI through a `Generator` that hands it out), with the folder's own scheduler
(DDIM, the one all three run), the same steps, guidance and threads. Each tool runs in a driver
process of its own (bench/peers/drive_*.py), kept alive; this script sends it requests. Latency:
each driver times its own prompt -> image calls at batch 1 with runtimes.bench.time_calls; the
rounds alternate the drivers call by call, and each figure is the median over the rounds. Export
time and peak RSS are those of the export process (wall clock; the kernel's ru_maxrss of the child).
Image quality: PSNR against diffusers' float32 StableDiffusionPipeline with the same scheduler,
steps and noise, and on the zoo model FD and the prompted-digit share (bench/t2i.py's judge).

Writes bench/results/peers.{json,md}. Run: bash bench/peers/setup.sh && python bench/peers.py
[--folder DIR] [--samples 256] [--rounds 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.metrics import DigitsJudge, psnr
from runtimes.bench import Stopwatch, processor_name
from runtimes.openvino_runner import cpu_has_bf16
from runtimes.text_to_image import diffusers_images, diffusers_pipeline, digit_view

HERE = Path(__file__).resolve().parent
PEERS, RESULTS = HERE / "peers", HERE / "results"
VENVS = {"optimum": PEERS / ".venv-optimum", "openvino": PEERS / ".venv-openvino"}
SCHEDULER, STEPS, GUIDANCE = "ddim", 8, 7.5
GOAL = 1.3  # the issue: ours at least 1.3x faster than every peer on the same CPU and runtime
# PSNR at or above this counts as exact: float32 pipelines differ from diffusers' by round-off alone (120 to 130 dB).
EXACT_PSNR = 60.0
MARK = "@@ "
OURS = "diffusion-compress (ours)"


def rows_to_run(work: Path, peer_source: Path, model: str, zoo: bool) -> list[dict]:
    """Each artifact: who makes it, how it is exported, which driver runs it on which runtime.

    On the zoo model ours is float32 and our W8A8, against every peer mode. On a Stable-Diffusion-size
    folder our int8 artifact is int8-weights (quantized from our float32 export): W8A8 calibration and
    optimum-intel's hybrid mode each run the UNet over a calibration set of full trajectories, hours on
    2 cores, so neither is run here (bench/results/scale.md has our W8A8 at that size). There, on a CPU
    with bf16, our OpenVINO rows run at bf16 only, the precision GenAI compiles at by default."""
    ours = [sys.executable, str(PEERS / "drive_ours.py"), "export", "--model", model, "--steps", str(STEPS), "--guidance", str(GUIDANCE)]
    ov_cli = [str(VENVS["openvino"] / "bin" / "optimum-cli"), "export", "openvino", "--model", str(peer_source), "--task", "text-to-image"]
    rows = [
        dict(tool="Optimum ONNX", mode="float32", runtime="onnxruntime", driver="optimum", out=work / "optimum",
             export=[str(VENVS["optimum"] / "bin" / "optimum-cli"), "export", "onnx", "--model", str(peer_source), "--task", "text-to-image", str(work / "optimum")]),
        dict(tool="optimum-intel + OpenVINO GenAI", mode="float32", runtime="openvino", driver="openvino", out=work / "ov-fp32",
             export=ov_cli + ["--weight-format", "fp32", str(work / "ov-fp32")]),
        dict(tool="optimum-intel + OpenVINO GenAI", mode="int8 weights", runtime="openvino", driver="openvino", out=work / "ov-int8",
             export=ov_cli + ["--weight-format", "int8", str(work / "ov-int8")]),
        dict(tool="optimum-intel + OpenVINO GenAI", mode="hybrid W8A8", runtime="openvino", driver="openvino", out=work / "ov-hybrid",
             export=[str(VENVS["openvino"] / "bin" / "python"), str(PEERS / "drive_openvino_genai.py"), "export-hybrid", str(peer_source),
                     str(work / "ov-hybrid"), str(work / "prompts.json")]),
    ]
    if not zoo:
        rows[-1].update(export=[], error="not run on this folder: the hybrid mode calibrates the UNet over full sampling trajectories, "
                                          "hours at this size on 2 cores (as our W8A8, which bench/results/scale.md measures)")
    rows.append(dict(tool="Optimum ONNX", mode="int8 / W8A8", runtime="onnxruntime", driver="optimum", out=work / "optimum-int8", export=[],
                     error="not offered: Optimum's text-to-image export has no int8 mode; its ORTQuantizer takes one ONNX file at a "
                           "time (not a pipeline) and was not run"))
    float_out = work / "ours-float32"
    runtimes = ["onnxruntime", "openvino"] + (["openvino-bf16"] if cpu_has_bf16() else [])
    if not zoo and cpu_has_bf16():  # GenAI's own precision here; an f32 compile of each SD sampler too would not fit in 24 GiB
        runtimes.remove("openvino")
    for mode, sub in (("float32", None), ("our W8A8" if zoo else "our int8 weights", "w8a8" if zoo else "int8-weights")):
        out = float_out if sub is None else work / f"ours-{sub}"
        export = ours + ["--mode", sub or "float32", "--out", str(out), "--prompts", str(work / "prompts.json")]
        if sub and not zoo:
            export += ["--float-dir", str(float_out)]
        for runtime in runtimes:
            rows.append(dict(tool=OURS, mode=mode, runtime=runtime, driver="ours", out=out / sub if sub else out, export_dir=out, export=export))
    return rows


def family(runtime: str) -> str:
    """The runtime a row competes on: openvino-bf16 is OpenVINO at the precision it picks itself on CPUs with bf16."""
    return runtime.split("-")[0]


def peer_folder(folder: Path, work: Path) -> tuple[Path, str | None]:
    """The folder as the peers can read it, with what had to change said in a note.

    A text encoder saved by transformers 5.x keeps its weights without the ``text_model.`` prefix; the
    transformers the peers pin (Optimum: <4.58; optimum-intel's 5.5) then load a randomly initialized
    text encoder without an error, only a log line. A tokenizer saved as tokenizer.json alone has no
    vocab.json and merges.txt, which Optimum's transformers 4.x CLIPTokenizer opens. The copy gets the
    same tensors under the prefixed names (which our transformers reads as well) and the vocabulary
    and merges of tokenizer.json as those two files."""
    from safetensors.torch import load_file, save_file

    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights) if weights.is_file() else {}
    rename = bool(tensors) and not all(k.startswith("text_model.") for k in tensors)
    tokenizer = folder / "tokenizer"
    vocab_missing = (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "vocab.json").is_file()
    scheduler = json.loads((folder / "model_index.json").read_text())["scheduler"][1]
    if not rename and not vocab_missing and scheduler == "DDIMScheduler":
        return folder, None
    copy = work / "peer-folder"
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    notes = []
    if rename:
        save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()},
                  copy / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        notes.append("the folder's text encoder (saved by transformers 5.x, keys without 'text_model.') loads as random weights, "
                     "silently, in the peers' transformers; they read a copy with the keys renamed, same tensors")
    if vocab_missing:
        bpe = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
        (copy / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        (copy / "tokenizer" / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        notes.append("its tokenizer is tokenizer.json alone, and Optimum's transformers 4.x opens vocab.json and merges.txt: "
                     "the copy has them, written from tokenizer.json's vocabulary and merges")
    if scheduler != "DDIMScheduler":  # the peers run the folder's own scheduler: the copy names the one every tool runs here
        index, config = copy / "model_index.json", copy / "scheduler" / "scheduler_config.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2))
        settings = {k: v for k, v in json.loads(config.read_text()).items() if k != "skip_prk_steps"}
        config.write_text(json.dumps({**settings, "_class_name": "DDIMScheduler", "clip_sample": False}, indent=2))
        notes.append(f"the folder's scheduler is {scheduler}; the peers' copy names DDIMScheduler with the same betas and offset, "
                     "the scheduler every tool runs here")
    return copy, "; ".join(notes)


def run_export(command: list[str], log: Path) -> dict:
    """One export as a child process: its wall time and the kernel's peak RSS of it (ru_maxrss)."""
    with Stopwatch() as clock, open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=driver_env())
        _, status, usage = os.wait4(child.pid, 0)
    result = {"export_s": clock.seconds, "export_peak_rss_mb": usage.ru_maxrss / 1024}
    if os.waitstatus_to_exitcode(status) != 0:
        result["error"] = last_error(log)
    return result


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or ["no output"])[-1])[:300]


def driver_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # our env's drivers import the toolkit; peers' only serve.py
    env.pop("VIRTUAL_ENV", None)
    return env


class Driver:
    """One tool's driver process, alive for the whole bench: one JSON request a line, one reply a line."""

    def __init__(self, name: str, command: list[str], threads: int, log: Path):
        env = {**driver_env(), "OMP_NUM_THREADS": str(threads)}
        self.name, self.log = name, open(log, "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def request(self, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps(fields, default=str) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"ok": False, "error": f"driver {self.name} exited (see {self.log.name})"}
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return {"ok": False, "error": f"driver {self.name} exited (see {self.log.name})"}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.log.close()


def start_drivers(threads: int, work: Path) -> dict[str, Driver]:
    drivers = {"ours": Driver("ours", [sys.executable, str(PEERS / "drive_ours.py"), "serve"], threads, work / "driver-ours.log")}
    for name, script in (("optimum", "drive_optimum.py"), ("openvino", "drive_openvino_genai.py")):
        python = VENVS[name] / "bin" / "python"
        if python.is_file():
            drivers[name] = Driver(name, [str(python), str(PEERS / script)], threads, work / f"driver-{name}.log")
    return drivers


def key(row: dict) -> str:
    return f"{row['tool']} | {row['mode']} | {row['runtime']}"


def export_all(rows: list[dict], work: Path) -> None:
    """Every export once (our two runtimes share one); a rerun on the same --work reuses what is recorded there."""
    record = work / "exports.json"
    done: dict[str, dict] = json.loads(record.read_text()) if record.is_file() else {}
    for row in rows:
        venv = VENVS.get(row["driver"])
        if "error" in row:
            continue
        if venv is not None and not (venv / "bin" / "python").is_file():
            row["error"] = f"{venv.name} is missing: run bench/peers/setup.sh"
            continue
        command = " ".join(row["export"])
        if command not in done:
            print(f"export: {key(row)}", flush=True)
            done[command] = run_export(row["export"], work / f"export-{len(done)}.log")
            record.write_text(json.dumps(done, indent=2))
        row.update(done[command])


def load_all(rows: list[dict], drivers: dict[str, Driver], threads: int, shape: tuple[int, int]) -> None:
    options = dict(steps=STEPS, guidance=GUIDANCE, height=shape[0], width=shape[1])
    for row in rows:
        if "error" in row:
            continue
        if row["driver"] not in drivers:
            row["error"] = f"no driver for {row['driver']}"
            continue
        reply = drivers[row["driver"]].request(op="load", name=key(row), folder=str(row["out"]), threads=threads,
                                               options={**options, "runtime": row["runtime"]})
        if not reply["ok"]:
            row["error"] = f"load: {reply['error']}"


def quality_all(rows, drivers, prompts, noise_file: Path, reference, labels, work: Path) -> None:
    judge = held_out = None
    if labels is not None:
        from compress.zoo.data import load_digits_tensors

        judge, held_out = DigitsJudge(), load_digits_tensors("heldout")[0]
    for i, row in enumerate(rows):
        if "error" in row:
            continue
        out = work / f"images-{i}.npy"
        reply = drivers[row["driver"]].request(op="images", name=key(row), prompts=prompts, noise=str(noise_file), out=str(out))
        if not reply["ok"]:
            row["error"] = f"images: {reply['error']}"
            continue
        images = torch.from_numpy(np.load(out))
        row["psnr_db"] = psnr(images, reference, 1.0)
        if judge is not None:
            row["fd"] = judge.fd(digit_view(images), held_out)
            row["prompted_digit_share"] = judge.agreement(digit_view(images), labels)


def time_all(rows, drivers, prompt: str, noise_file: Path, rounds: int, warmup: int) -> None:
    """Rounds that alternate the tools call by call; each driver times its own call (time_calls)."""
    live = [row for row in rows if "error" not in row]
    for row in live:  # warm-up: first calls (allocations, caches) are not timed
        drivers[row["driver"]].request(op="time", name=key(row), prompt=prompt, noise=str(noise_file), runs=1, warmup=warmup)
        row["round_ms"] = []
    for _ in range(rounds):
        for row in live:
            reply = drivers[row["driver"]].request(op="time", name=key(row), prompt=prompt, noise=str(noise_file), runs=1, warmup=0)
            row["round_ms"] += reply.get("ms", [])
    for row in live:
        if row["round_ms"]:
            row["latency_ms"] = float(np.median(row["round_ms"]))
            row["latency_p90_ms"] = float(np.percentile(row["round_ms"], 90))


def artifact_bytes(row: dict) -> int | None:
    """Bytes of the files the prompt -> image path reads (the VAE encoder left out for every tool)."""
    folder = Path(row["out"])
    if row["driver"] == "ours":
        from runtimes.validate import artifact_bytes as file_bytes

        info = json.loads((folder / "pipeline.json").read_text())
        fmt = "onnx" if row["runtime"] == "onnxruntime" else "openvino"
        files = [info["components"][k][fmt] for k in ("sampler", *[e["name"] for e in info["text_encoders"]])]
        return sum(file_bytes(folder / f) for f in files) + sum((folder / t["file"]).stat().st_size for t in info["tokenizers"].values())
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "vae_encoder" not in p.parts)


def fake_quantize_ops(row: dict) -> int | None:
    """FakeQuantize nodes in the IR that runs the denoiser (our sampler.xml unrolls every step; GenAI's UNet is one step)."""
    folder = Path(row["out"])
    xml = folder / "sampler.xml" if row["driver"] == "ours" else folder / "unet" / "openvino_model.xml"
    return xml.read_text().count('type="FakeQuantize"') if row["runtime"] == "openvino" and xml.is_file() else None


def speed_vs_ours(rows: list[dict]) -> None:
    """Each peer row against our fastest artifact on the same runtime at equal or better PSNR."""
    for row in rows:
        for stale in ("ours_compared", "ours_compared_key", "speed_vs_ours"):
            row.pop(stale, None)
        if row["tool"] == OURS or "latency_ms" not in row:
            continue
        ours = [r for r in rows if r["tool"] == OURS and family(r["runtime"]) == family(row["runtime"]) and "latency_ms" in r
                and min(r.get("psnr_db", -1), EXACT_PSNR) >= min(row.get("psnr_db", float("inf")), EXACT_PSNR)]
        if ours:
            best = min(ours, key=lambda r: r["latency_ms"])
            row["ours_compared"] = best["mode"].removeprefix("our ") + ("" if best["runtime"] == row["runtime"] else f" on {best['runtime']}")
            row["ours_compared_key"] = key(best)
            row["speed_vs_ours"] = row["latency_ms"] / best["latency_ms"]


def versions() -> dict:
    out = {}
    for name, venv in VENVS.items():
        freeze = venv / "freeze.txt"
        if freeze.is_file():
            wanted = ("torch", "optimum", "onnx", "onnxruntime", "openvino", "diffusers", "transformers", "nncf")
            out[name] = {p.split("==")[0]: p.split("==")[1] for p in freeze.read_text().split() if "==" in p and p.split("==")[0].lower().startswith(wanted)}
    import diffusers
    import onnxruntime
    import openvino

    out["ours"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version().split("-")[0],
                   "diffusers": diffusers.__version__}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="zoo:digits-t2i")
    parser.add_argument("--folder", type=Path, help="a diffusers StableDiffusionPipeline folder instead of the zoo model")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each artifact before the rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="keep exports and logs here (default: a temporary folder)")
    parser.add_argument("--render", action="store_true", help="only rewrite peers.md from peers.json")
    args = parser.parse_args()
    if args.render:
        return write_results(None) and None
    from compress.loading import load_pipeline
    from compress.sampling import make_noise

    model = f"diffusers:{args.folder}" if args.folder else args.model
    pipeline = load_pipeline(model)
    folder = Path(pipeline.extra["folder"])
    zoo = model.startswith("zoo:")
    if zoo:
        from compress.zoo.t2i import digit_prompts

        prompts, labels = digit_prompts(args.samples)
    else:
        prompts, labels = ["a photograph of an astronaut riding a horse"] * args.samples, None
    noise = make_noise(pipeline.denoiser, args.samples, seed=0)
    work = args.work or Path(tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    noise_file = work / "noise.npy"
    np.save(noise_file, noise.numpy())
    (work / "prompts.json").write_text(json.dumps(list(dict.fromkeys(prompts))))
    torch.set_num_threads(args.threads)
    pipe = diffusers_pipeline(folder, SCHEDULER)
    reference = diffusers_images(pipe, prompts, noise, STEPS, GUIDANCE)
    shape = tuple(reference.shape[2:])
    del pipe

    peer_source, peer_note = peer_folder(folder, work)
    rows = rows_to_run(work, peer_source, model, zoo)
    export_all(rows, work)
    drivers = start_drivers(args.threads, work)
    try:
        load_all(rows, drivers, args.threads, shape)
        quality_all(rows, drivers, prompts, noise_file, reference, labels, work)
        time_all(rows, drivers, prompts[0], noise_file, args.rounds, args.warmup)
        for name, driver in drivers.items():
            rss = driver.request(op="rss")
            for row in rows:
                if row["driver"] == name:
                    row["driver_peak_rss_mb"] = rss.get("peak_rss_mb")
    finally:
        for driver in drivers.values():
            driver.close()
    for row in rows:
        row["artifact_bytes"] = artifact_bytes(row) if "export_s" in row and "error" not in row else None
        row["fake_quantize_ops"] = fake_quantize_ops(row) if "error" not in row else None
    speed_vs_ours(rows)
    result = {"model": model if zoo else f"SD-1.5 architecture, random weights ({folder.name})", "folder": str(folder), "samples": args.samples,
              "scheduler": SCHEDULER, "steps": STEPS, "guidance_scale": GUIDANCE, "threads": args.threads, "peer_folder_note": peer_note,
              "rounds": args.rounds, "warmup": args.warmup, "resolution": list(shape), "processor": processor_name(), "cpu_count": os.cpu_count(),
              "versions": versions(),
              "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k not in ("export",)} for row in rows]}
    print(write_results(result))


def write_results(result: dict | None) -> str:
    """peers.json holds one run per model (a new run of a model replaces its old one); peers.md shows them all."""
    path = RESULTS / "peers.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    runs = data.get("models") or ({data["model"]: data} if "model" in data else {})
    if result is not None:
        runs[result["model"]] = result
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps({"models": runs}, indent=2, default=str) + "\n")
    for run in runs.values():
        speed_vs_ours(run["rows"])
    text = "\n".join(markdown(r) for r in runs.values())
    (RESULTS / "peers.md").write_text(text)
    return text


def why_slower(r: dict) -> list[str]:
    """The note the issue asks for where ours is not 1.3x faster: what this run shows about why."""
    rows = {(row["tool"] == OURS, row["mode"], row["runtime"]): row for row in r["rows"] if "latency_ms" in row}
    peers = [row for row in r["rows"] if row.get("speed_vs_ours") is not None]
    if not peers or min(row["speed_vs_ours"] for row in peers) >= GOAL:
        return []
    notes = []
    ort_peer, ort_ours = rows.get((False, "float32", "onnxruntime")), rows.get((True, "float32", "onnxruntime"))
    if ort_peer and ort_ours:
        gap = ort_peer["latency_ms"] - ort_ours["latency_ms"]
        notes.append(f"on onnxruntime the same float32 networks run in both tools, so what baking can win is the host loop: Optimum's "
                     f"Python scheduler loop with one session call per step took {abs(gap):.1f} ms a prompt {'more' if gap >= 0 else 'less'} "
                     f"than our one graph here ({abs(gap) / r['steps']:.2f} ms a step, against a {ort_ours['latency_ms'] / r['steps']:.1f} ms step)")
    if any(row["runtime"] == "openvino-bf16" for row in r["rows"]):
        notes.append("GenAI compiles with OpenVINO's CPU defaults, which on this CPU (its plugin reports BF16) run in bf16; our "
                     "`openvino` rows pin f32, so the like-for-like rows are `openvino-bf16`; GenAI's C++ loop calls the UNet "
                     "once a step, as our unrolled graph does")
    fq = {ours: row.get("fake_quantize_ops") for (ours, mode, runtime), row in rows.items() if runtime == "openvino" and "W8A8" in mode}
    if fq.get(True) and fq.get(False):
        notes.append(f"our W8A8 keeps per-step scales, so the unrolled sampler carries a quantizer set per step ({fq[True]} FakeQuantize "
                     f"nodes in sampler.xml against {fq[False]} in GenAI's hybrid UNet, which it calls once a step)")
    notes.append("the 2-core machine was shared with other work during the run; the interleaved calls share that load alike, "
                 "but every absolute figure here is higher than on a quiet machine")
    return ["", "Why ours is not 1.3x faster everywhere: " + "; ".join(notes) + "."]


def fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def markdown(r: dict) -> str:
    size = "x".join(str(v) for v in r["resolution"]) + " images, " if r.get("resolution") else ""
    lines = [f"# Peers on {r['model']}", "",
             f"{r['samples']} prompts, {size}one latent noise each (seed 0), {r['scheduler'].upper()} {r['steps']} steps, guidance {r['guidance_scale']}, "
             f"{r['threads']} intra-op thread(s) for every tool; CPU: {r['processor']} ({r['cpu_count']} cores, shared with other work).", "",
             "| tool | mode | runtime | prompt -> image ms (batch 1) | ours faster by | artifact MB | export s | export peak RSS MB | "
             "PSNR dB vs diffusers f32 | FD | prompted digit | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        notes = row.get("error", "")
        if row.get("speed_vs_ours") is not None:
            notes = f"against our {row['ours_compared']}" + (f"; {notes}" if notes else "")
        if row["driver"] == "openvino" and "error" not in row:
            notes += "; uint8 output (GenAI's), our noise through its Generator"
        lines.append(f"| {row['tool']} | {row['mode']} | {row['runtime']} | {fmt(row.get('latency_ms'), '.1f')} | "
                     f"{fmt(row.get('speed_vs_ours'), '.2f', 'x')} | {fmt(row['artifact_bytes'] and row['artifact_bytes'] / 1e6, '.2f')} | "
                     f"{fmt(row.get('export_s'), '.1f')} | {fmt(row.get('export_peak_rss_mb'), '.0f')} | {fmt(row.get('psnr_db'), '.1f')} | "
                     f"{fmt(row.get('fd'), '.2f')} | {fmt(row.get('prompted_digit_share'), '.1%')} | {notes.strip('; ')} |")
    if r.get("peer_folder_note"):
        lines += ["", f"Folder layout: {r['peer_folder_note']}."]
    lines += ["", "## The fastest peer against our fastest artifact at equal or better PSNR", "",
              "| runtime | fastest peer (mode) | its ms | ours (mode) | our ms | speed-up | goal >= 1.3x |", "|---|---|---|---|---|---|---|"]
    for runtime in ("onnxruntime", "openvino"):
        peers = [row for row in r["rows"] if row["tool"] != OURS and family(row["runtime"]) == runtime and row.get("speed_vs_ours")]
        if not peers:
            lines.append(f"| {runtime} | no peer row measured | | | | | |")
            continue
        peer = min(peers, key=lambda row: row["latency_ms"])
        ours = next(row for row in r["rows"] if key(row) == peer["ours_compared_key"])
        ratio = peer["speed_vs_ours"]
        lines.append(f"| {runtime} | {peer['tool']} ({peer['mode']}) | {peer['latency_ms']:.1f} | {ours['mode']} on {ours['runtime']} | {ours['latency_ms']:.1f} | "
                     f"{ratio:.2f}x | {'yes' if ratio >= GOAL else 'no: slower than the goal'} |")
    lines += why_slower(r)
    lines += ["", "How it was measured: every tool runs in a process of its own (bench/peers/drive_*.py, each peer in its own venv) "
              "kept alive for the whole run; each times its own prompt -> image call with runtimes.bench.time_calls (perf_counter, "
              f"{r.get('warmup', 3)} untimed warm-up calls first), and the calls alternate tool by tool over {r['rounds']} rounds; each figure is the median. "
              "'Ours faster by' is the peer's latency over our fastest artifact on the same runtime whose PSNR is equal or better "
              f"(PSNR from {EXACT_PSNR:g} dB up counts as exact: float32 round-off). "
              "Artifact MB: the files the prompt -> image path reads (VAE encoder left out for every tool). Export s and peak RSS: "
              "the export process from the diffusers folder (ours in W8A8 includes the float32 export, calibration and quantization; "
              "our export writes ONNX and OpenVINO IR in one go).", "",
              "Versions: " + "; ".join(f"{env}: " + ", ".join(f"{k} {v}" for k, v in sorted(pk.items())) for env, pk in r["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
