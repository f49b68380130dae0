"""Validation of text-to-image exports in pixel space: prompts -> images, against diffusers' own pipeline.

The baseline is the diffusers pipeline's ``__call__`` (float32, the recipe's reference scheduler
and steps) from fixed latent noise and prompts; it is stored, so later validations compare with
the same images. An export folder is run the way an app runs it (`PipelineRunner`: the
tokenizer.json files, the text encoder(s), then the sampler with the decoder baked in) on one
runtime, and its images are compared with the baseline's: PSNR and SSIM over [0, 1], and for the
zoo's digits FD and the share of samples that show the prompted digit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress.errors import UserError
from compress.schedule import FLOW_SCHEDULERS, is_flow_scheduler_config
from compress.metrics import psnr, ssim
from runtimes.bench import benchmark
from runtimes.runners import first_line, get_runner

# Our solver names -> the diffusers scheduler that runs the same method (from the pipeline's own config).
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "unipc-bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}
# On a flow-matching pipeline (SD3) the same names are diffusers' flow schedulers: a VP scheduler built from a
# FlowMatch config would sample a different model.
FLOW_DIFFUSERS_SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc-bh1": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "unipc-bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}
IMAGES_FILE, INFO_FILE = "images.safetensors", "baseline.json"
FORMAT_OF_RUNTIME = {"onnxruntime": "onnx", "onnxruntime-cuda": "onnx", "onnxruntime-tensorrt": "onnx", "openvino": "openvino",
                     "openvino-bf16": "openvino", "openvino-gpu": "openvino", "openvino-npu": "openvino", "coreml": "coreml"}


def diffusers_pipeline(folder: str | Path, scheduler: str | None = None):
    """The folder's diffusers pipeline in float32, quiet, with ``scheduler`` (one of ours) built from its own config."""
    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    # Components the folder leaves out ([null, null], as SD3 without its T5) load only when passed as None.
    absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[:1] == [None]}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **absent)  # float32, as saved
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        config = pipe.scheduler.config
        flow = is_flow_scheduler_config(dict(config))
        table = FLOW_DIFFUSERS_SCHEDULERS if flow else DIFFUSERS_SCHEDULERS
        if scheduler not in table:
            kind = "flow-matching " if flow else ""
            raise UserError(f"reference solver {scheduler!r} has no diffusers scheduler here for this {kind}pipeline (available: {', '.join(table)})")
        if flow and scheduler != "euler" and type(pipe).__name__ == "FluxPipeline":  # it passes its own sigmas, which only FlowMatch Euler takes
            raise UserError(f"reference solver {scheduler!r}: FluxPipeline samples with FlowMatchEulerDiscreteScheduler only; use 'euler'")
        cls, options = table[scheduler]
        if flow and cls not in FLOW_SCHEDULERS:  # a multistep solver on the flow's own shifted sigmas
            shift = config.get("shift", config.get("flow_shift", 1.0))  # FlowMatch's shift, or a multistep scheduler's own flow_shift (Sana)
            options = {**options, "use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(shift)}
        pipe.scheduler = getattr(diffusers, cls).from_config(config, **options)
    return pipe


@torch.no_grad()
def diffusers_images(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance_scale: float | None,
                     negative_prompt: str | None = None, batch_size: int = 32, show_progress: bool = True) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from diffusers' own ``__call__``, one latent noise per prompt."""
    from compress.progress import progress

    _, c, h, w = noise.shape
    scale = pipe.vae_scale_factor
    kind = type(pipe).__name__
    # PixArt and Sana would snap the size to their aspect-ratio bins and clean captions with optional libraries; the export does neither.
    extra = {"use_resolution_binning": False, "clean_caption": False} if kind.startswith(("PixArt", "Sana")) else {}
    out = []
    batches = range(0, len(prompts), batch_size)
    for start in progress(batches, description=f"diffusers {type(pipe.scheduler).__name__}-{steps}") if show_progress else batches:
        chunk = prompts[start : start + batch_size]
        latents = noise[start : start + len(chunk)].clone()
        if kind == "FluxPipeline":  # the toolkit's [B, C, H, W] noise in FLUX's packed layout
            latents = pipe._pack_latents(latents, len(chunk), c, h, w)
        # Without a negative prompt each pipeline takes its own default (PixArt's is "", and it cannot take None).
        negative = {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * len(chunk)}
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=1.0 if guidance_scale is None else guidance_scale, latents=latents,
                      height=h * scale, width=w * scale, output_type="np", **negative, **extra)
        out.append(torch.from_numpy(result.images).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def digit_view(images: torch.Tensor) -> torch.Tensor:
    """RGB images in [0, 1] as the zoo classifier reads digits: one channel in [-1, 1]."""
    return images.mean(1, keepdim=True) * 2 - 1


@dataclass
class ImageBaseline:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], diffusers' pipeline with the reference scheduler
    noise: torch.Tensor  # [N, c, h, w] standard normal latents
    prompts: list[str]
    negative_prompt: str | None
    guidance_scale: float | None
    labels: torch.Tensor | None = None  # the prompted digit, for zoo models
    info: dict = field(default_factory=dict)
    judge: object | None = None
    held_out: torch.Tensor | None = None

    @property
    def samples(self) -> torch.Tensor:  # the name `Baseline` gives its reference outputs
        return self.images

    def quality(self, images: torch.Tensor) -> dict:
        out = {"psnr": psnr(images, self.images, 1.0), "ssim": ssim(images, self.images, 1.0),
               "max_abs_error": float((images - self.images).abs().max())}
        if self.judge is not None:
            out.update(self.judge.summary(digit_view(images), self.held_out, self.labels))
        return out

    def save(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images, "noise": self.noise}
        if self.labels is not None:
            tensors["labels"] = self.labels
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / IMAGES_FILE))
        info = {**self.info, "prompts": self.prompts, "negative_prompt": self.negative_prompt, "guidance_scale": self.guidance_scale}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return [folder / IMAGES_FILE, folder / INFO_FILE]

    @classmethod
    def load(cls, folder: Path, **kwargs) -> "ImageBaseline":
        from safetensors.torch import load_file

        tensors = load_file(str(folder / IMAGES_FILE))
        info = json.loads((folder / INFO_FILE).read_text())
        return cls(tensors["images"], tensors["noise"], info.pop("prompts"), info.pop("negative_prompt"), info.pop("guidance_scale"),
                   tensors.get("labels"), info, **kwargs)


def join_text(info: dict, hidden: dict, pooled: list) -> dict:
    """The encoders' outputs -> the sampler's text inputs, as pipeline.json's text_layout says (SD3 pads and stacks on the sequence)."""
    names = [e["name"] for e in info["text_encoders"]]
    layout = info.get("text_layout") or {"channels": names, "pad_channels_to": None, "sequence": [], "zero_tokens": 0}
    states = np.concatenate([hidden[n] for n in layout["channels"]], axis=-1)
    if layout["pad_channels_to"]:
        states = np.pad(states, ((0, 0), (0, 0), (0, layout["pad_channels_to"] - states.shape[-1])))
    parts = [states] + [hidden[n] for n in layout["sequence"]]
    if layout["zero_tokens"]:
        parts.append(np.zeros((states.shape[0], layout["zero_tokens"], states.shape[-1]), np.float32))
    feeds = {"encoder_hidden_states": np.concatenate(parts, axis=1)}
    if pooled:
        feeds[info.get("pooled_input") or "text_embeds"] = np.concatenate(pooled, axis=-1)
    return feeds


class PipelineRunner:
    """An exported text-to-image folder on one runtime: prompts -> images, as an app chains the files."""

    def __init__(self, folder: str | Path, runtime: str, threads: int | None = None):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.runtime = runtime
        self.info = json.loads((self.folder / "pipeline.json").read_text())
        fmt = FORMAT_OF_RUNTIME[runtime]
        self.encoders = self.info["text_encoders"]
        self.runners = {}
        for kind in [e["name"] for e in self.encoders] + ["sampler"]:
            file = self.info["components"].get(kind, {}).get(fmt)
            if file is None:
                raise UserError(f"{self.folder} has no {fmt} file for {kind}")
            self.runners[kind] = get_runner(runtime, threads).load(self.folder / file)
        tokenizers = self.info["tokenizers"]
        self.tokenizers = {e["tokenizer"]: Tokenizer.from_file(str(self.folder / tokenizers[e["tokenizer"]]["file"])) for e in self.encoders}
        # Sana's negative prompts have their own tokenizer (no instruction prefix).
        self.negative_tokenizers = {**self.tokenizers, **{name: Tokenizer.from_file(str(self.folder / t["negative_file"]))
                                                          for name, t in tokenizers.items() if "negative_file" in t}}
        self.sampler_inputs = [i["name"] for i in json.loads((self.folder / "sampler.json").read_text())["inputs"]]

    def token_ids(self, prompts: list[str], negative: bool = False) -> dict[str, np.ndarray]:
        tokenizers = self.negative_tokenizers if negative else self.tokenizers
        return {name: np.array([e.ids for e in tok.encode_batch(list(prompts))], np.int64) for name, tok in tokenizers.items()}

    def encode(self, prompts: list[str], negative: bool = False) -> dict[str, np.ndarray]:
        """Prompts (``negative``: negative prompts) -> the sampler's condition inputs."""
        ids = self.token_ids(prompts, negative)
        hidden, pooled, masks = {}, [], []
        for e in self.encoders:
            outputs = self.runners[e["name"]].run_outputs({"input_ids": ids[e["tokenizer"]]})
            hidden[e["name"]] = outputs[0]
            if e["pooled"]:
                pooled.append(outputs[1])
            if e.get("attention_mask"):  # PixArt and Sana: the sampler takes the prompt's mask too
                masks.append(outputs[-1])
        feeds = join_text(self.info, hidden, pooled)
        if masks:
            feeds["encoder_attention_mask"] = np.concatenate(masks, axis=-1)
        return feeds

    def feeds(self, prompts: list[str], noise: np.ndarray, negative_prompt: str | None = None, guidance_scale: float | None = None) -> dict:
        feeds = {"noise": np.asarray(noise, np.float32), **self.encode(prompts)}
        if "negative_encoder_hidden_states" in self.sampler_inputs:
            negative = self.encode([negative_prompt or ""] * len(prompts), negative=True)
            if negative_prompt is None and self.info["guidance"]["zeros_for_empty_negative_prompt"]:
                negative = {k: np.zeros_like(v) for k, v in negative.items()}
            feeds.update({f"negative_{k}": v for k, v in negative.items()})
        if "guidance_scale" in self.sampler_inputs:
            scale = self.info["guidance"]["default_scale"] if guidance_scale is None else guidance_scale
            feeds["guidance_scale"] = np.array([scale], np.float32)
        if "time_ids" in self.sampler_inputs:
            h, w = self.info["image"]["shape"][2:]
            feeds["time_ids"] = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (len(prompts), 1))
        return {k: v for k, v in feeds.items() if k in self.sampler_inputs}

    def generate(self, prompts: list[str], noise: np.ndarray, negative_prompt: str | None = None, guidance_scale: float | None = None) -> np.ndarray:
        return self.runners["sampler"].run(self.feeds(prompts, noise, negative_prompt, guidance_scale))

    def images(self, baseline: ImageBaseline, chunk: int = 32) -> torch.Tensor:
        out = []
        for start in range(0, len(baseline.prompts), chunk):
            stop = start + chunk
            out.append(torch.from_numpy(np.asarray(self.generate(baseline.prompts[start:stop], baseline.noise[start:stop].numpy(),
                                                                 baseline.negative_prompt, baseline.guidance_scale))))
        return torch.cat(out).float()

    def latencies(self, prompt: str, noise: np.ndarray, negative_prompt: str | None, guidance_scale: float | None, runs: int) -> dict:
        """Latency at batch 1 (one prompt, ``noise`` [1, c, h, w]) of each component and of the whole prompt -> image path."""
        ids = self.token_ids([prompt])
        out = {}
        for e in self.encoders:
            out[f"latency_{e['name']}_ms"] = benchmark(self.runners[e["name"]], {"input_ids": ids[e["tokenizer"]]}, runs=runs, warmup=2)["latency_ms"]["median"]
        feeds = self.feeds([prompt], noise, negative_prompt, guidance_scale)
        out["latency_sampler_ms"] = benchmark(self.runners["sampler"], feeds, runs=runs, warmup=2)["latency_ms"]["median"]
        whole = benchmark(_WholePath(self, [prompt], noise, negative_prompt, guidance_scale), {"noise": noise}, runs=runs, warmup=2)
        out.update(latency_ms=whole["latency_ms"]["median"], latency_p90_ms=whole["latency_ms"]["p90"], peak_rss_mb=whole["memory"].get("peak_rss_mb"), batch=1)
        return out

    def bytes(self) -> dict[str, int]:
        """Bytes on disk of every file the prompt -> image path reads, by component."""
        from runtimes.validate import artifact_bytes

        return {kind: artifact_bytes(Path(runner_path)) for kind, runner_path in self._paths().items()}

    def _paths(self) -> dict[str, Path]:
        fmt = FORMAT_OF_RUNTIME[self.runtime]
        return {kind: self.folder / self.info["components"][kind][fmt] for kind in self.runners}


class _WholePath:
    """The whole prompt -> image path behind the runner interface, for `benchmark`."""

    def __init__(self, pipeline: PipelineRunner, prompts: list[str], noise: np.ndarray, negative_prompt: str | None, guidance_scale: float | None):
        self.pipeline, self.args = pipeline, (prompts, noise, negative_prompt, guidance_scale)
        self.name, self.device, self.threads = pipeline.runtime, "cpu", None

    def run(self, feeds):
        return self.pipeline.generate(*self.args)

    def describe(self) -> dict:
        return self.pipeline.runners["sampler"].describe()

    def peak_device_memory_mb(self):
        return None


def validate_pipeline_folder(folder: Path, baseline: ImageBaseline, name: str, runtimes: list[str] | None = None, runs: int = 10,
                             log=lambda m: None, on_images=lambda row, images: None) -> list[dict]:
    """One row per runtime that can run the folder's files: image quality against the baseline, latencies, bytes."""
    info = json.loads((folder / "pipeline.json").read_text())
    formats = {fmt for files in info["components"].values() for fmt in files}
    schemes = {kind: (json.loads((folder / f"{kind}.json").read_text()).get("quantization") or {}).get("scheme") or "float32"
               for kind in info["components"] if (folder / f"{kind}.json").is_file()}
    common = {"artifact": name, "format": "pipeline", "solver": info["solver"]["name"], "steps": info["solver"]["steps"],
              "nfe": info["solver"]["nfe"], "scheme": "+".join(sorted(set(schemes[k] for k in schemes if k in ("sampler", *[e["name"] for e in info["text_encoders"]])))),
              "schemes": schemes}
    rows = []
    for runtime, fmt in FORMAT_OF_RUNTIME.items():
        if fmt not in formats or (runtimes is not None and runtime not in runtimes):
            continue
        probe = get_runner(runtime)
        ok, reason = probe.available()
        if not ok:
            if runtime in ("onnxruntime", "openvino", "coreml"):
                rows.append({**common, "runtime": runtime, "device": probe.device, "status": "skipped", "reason": reason})
            continue
        log(f"validate: {name} on {runtime}")
        try:
            runner = PipelineRunner(folder, runtime)
            images = runner.images(baseline)
            timing = runner.latencies(baseline.prompts[0], baseline.noise[:1].numpy(), baseline.negative_prompt, baseline.guidance_scale, runs)
            sizes = runner.bytes()
        except Exception as e:  # a runtime that cannot run an artifact is a finding for the report, not a crash
            rows.append({**common, "runtime": runtime, "device": probe.device, "status": "failed", "reason": first_line(e)})
            continue
        rows.append({**common, "runtime": runtime, "device": probe.device, "status": "ok", **timing, **baseline.quality(images),
                     "bytes": sum(sizes.values()), "bytes_by_component": sizes, "runner": runner.runners["sampler"].describe()})
        on_images(rows[-1], images)
    return rows
