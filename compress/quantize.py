"""Post-training quantization of exported artifacts: one call, one config.

    records = quantize_("out/export", load_calibration("calib.safetensors"), QuantizeConfig(scheme="w8a8"), out_dir="out/int8")

NNCF is the engine (``nncf.quantize`` for W8A8, ``nncf.compress_weights`` for weight-only); what
is ours is how a diffusion sampler is fed to it:

- **per-step** (the unrolled sampler.onnx): NNCF calibrates the whole unrolled graph by running
  it from the calibration set's trajectory starts (x_T, condition, guidance scale). Every step has
  its own nodes, so every step's activations get their own scales, computed on exactly the states
  the baked solver produces, at no runtime cost.
- **shared**: one scale per layer for all steps. ``shared_from="denoiser"`` (default) quantizes
  denoiser.onnx once on the calibration set's recorded (x_t, t, cond) and writes each layer's
  scales into every step of the sampler (the classic PTQ4DM / Q-Diffusion setting, where the
  timestep sampler matters); ``"union"`` gives each layer the union of its per-step ranges.
  Quantizers are matched by the layer they feed (node name without the step prefix).
- The solver's own arithmetic (the state x, guidance mixing) stays float32: only nodes inside
  the network are quantized. What else stays float is read from the graph (`compress.precision`):
  each network's first and last weighted layers, the conditioning path (timestep, class and
  pooled embeddings), and the attention MatMul that reads softmax probabilities. With a quality
  target (``target_psnr``) the most sensitive layers go back to float until the sampler meets it.
  A 1x1 conv on a channel concat (UNet skip connections) is split into one conv per half (exact
  in float) so each half gets its own quantizer.
- Large float constants that are not conv/linear weights (normalization affine maps over the
  whole (C, H, W) map, embedding tables) become int8 per channel with a DequantizeLinear, so the
  file is as small as its precision says.
- Bias correction is off for the unrolled sampler: its steps share bias initializers, and NNCF
  writes each node's corrected bias into that one initializer, so the last step's correction
  would apply to all steps. The denoiser keeps NNCF's fast bias correction.
- Weights are real integers (int8 initializers + DequantizeLinear, stored once for all steps).
  w8a16 turns the activation quantizers into int16 (com.microsoft QuantizeLinear, which
  onnxruntime runs); fp16 stores float16 weights with a Cast (onnxruntime folds it at load).

The export target (`export.targets`, recorded in the export's sidecar or given as ``target``)
fixes the QDQ layout: ``generic`` and ``npu-openvino`` are the NNCF path above (uint8 asymmetric
activations, int8 symmetric per-channel weights; NNCF's NPU hardware config for npu-openvino);
``npu-qnn`` / ``npu-qnn-w8a16`` are quantized by onnxruntime's own QNN tooling (qnn_preprocess_model,
get_qnn_qdq_config), since QNN HTP runs every op in integers: uint8 / uint16 asymmetric activations,
int32 biases, per-tensor MatMul weights, 16-bit Q/DQ in the com.microsoft domain. The layout the file
actually has is read back into the sidecar (``quantization.qdq_layout``); an NPU target's must match.

Each quantized artifact gets the float sidecar plus a ``quantization`` section.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.errors import UserError, unknown_choice
from compress.outputs import sha256_of, staged_files
from compress.precision import WEIGHTED_OPS, structural_float_nodes, summarize_layers
from compress.section_config import SectionConfig
from export.onnx_graph import (DECODER_SCOPE, STEP_PREFIX, consumers, drop_dead_nodes, drop_default_attributes, drop_unused_initializers, input_uses,
                               inside_network, module_path, producers, topological)
from export.onnx_weights import WeightStore, copy_onnx, external_files, onnx_bytes, save_onnx
from export.sidecar import PIPELINE_FILE, target_section
from export.targets import TARGETS as EXPORT_TARGETS

SCHEMES = ("w8a8", "w8a16", "int8-weights", "int4-weights", "fp16")
GRANULARITIES = ("per-step", "shared")
SHARED_FROM = ("denoiser", "union")
PRESETS = ("mixed", "performance")
TARGETS = ("sampler", "denoiser")
# A text encoder has no calibration inputs here (token ids are recorded for nothing else): weights only.
TEXT_ENCODER_SCHEMES = ("int8-weights", "int4-weights", "fp16")
# Besides sampler and denoiser, the graphs of a text-to-image export (see pipeline.json).
PIPELINE_KINDS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder", "vae_encoder")
CALIBRATED = ("w8a8", "w8a16")
# Float constants of at least this many elements outside conv/linear weights are stored int8.
CONSTANT_MIN_ELEMENTS = 1024


@dataclass
class QuantizeConfig(SectionConfig):
    """The recipe's ``quantize`` section: ``QuantizeConfig(**section)``.

    scheme       w8a8 | w8a16 (int16 activations) | int8-weights | int4-weights | fp16
    granularity  per-step (own scales per unrolled step) | shared (one scale per layer for all steps)
    shared_from  denoiser (scales of the denoiser calibrated once on the set) | union (of per-step ranges)
    ignored      extra node-name regexes kept in float, added to the layers the graph's structure keeps
                 float (`compress.precision`; ``default_ignored: false`` drops those)
    target_psnr  quality target in dB of the final sample against the float32 sampler: the most
                 sensitive layers go back to float until it is met (None: the defaults alone)
    target_samples  fresh noise draws the target is measured on
    max_float_layers  at most this many layers (or sampler steps) go back to float for the target (None: a quarter of them)
    require_target  a missed target fails (exit 1) instead of warning; the best file is written either way
    keep_softmax the MatMul reading attention probabilities stays float (Q-Diffusion keeps them 16-bit)
    split_concat a conv on a channel concat becomes one conv per input, each with its own input quantizer
                 (Q-Diffusion's shortcut splitting). Off by default: the partial sums NNCF then quantizes
                 cost more than one scale over both inputs does (dpmpp-2m 8 steps, 1024 draws: zoo:digits
                 28.4 dB without against 25.3 with, zoo:digits-cond 29.0 against 24.1, and a smaller file)
    elementwise  let NNCF quantize residual adds too; onnxruntime's CPU int8 kernels need it for speed
    smooth_quant SmoothQuant alpha for transformer denoisers (DiT, MMDiT); None: 0.8 for transformers, off for UNets;
                 0 turns it off (an alpha of 0 would move all of every weight's range onto the activations)
    fuse_outputs give int8 convs that feed only float ops an output quantizer (min-max), so that
                 onnxruntime fuses every conv into QLinearConv (without it such convs run slower than float)
    preset       NNCF preset: mixed (asymmetric activations) or performance (symmetric)
    subset_size  calibration inputs NNCF uses (trajectories for the sampler, states for the denoiser)
    targets      which graphs of an export folder to quantize
    target       export target whose QDQ layout to emit (generic | npu-qnn | npu-qnn-w8a16 | npu-openvino);
                 None: the one the export's sidecars record, else generic
    """

    section = "quantize"

    scheme: str = "w8a8"
    granularity: str = "per-step"
    shared_from: str = "denoiser"
    ignored: list[str] = field(default_factory=list)
    default_ignored: bool = True
    keep_softmax: bool = True
    split_concat: bool = False
    elementwise: bool = True
    smooth_quant: float | None = None
    fuse_outputs: bool = True
    preset: str = "mixed"
    subset_size: int = 256
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    # Text-to-image pipelines: a scheme per component (None keeps it float). ``denoiser`` is ``scheme``.
    denoiser: str | None = None
    decoder: str | None = None
    text_encoder: str | None = None
    target_psnr: float | None = None
    target_samples: int = 512
    max_float_layers: int | None = None
    require_target: bool = False
    target: str | None = None

    def __post_init__(self):
        if self.denoiser is not None:
            self.scheme = self.denoiser
        self.validate()

    def validate(self) -> "QuantizeConfig":
        for name, value, allowed in (("scheme", self.scheme, SCHEMES), ("granularity", self.granularity, GRANULARITIES),
                                     ("shared_from", self.shared_from, SHARED_FROM), ("preset", self.preset, PRESETS)):
            if value not in allowed:
                raise unknown_choice(f"quantize {name}", value, allowed)
        for component in ("decoder", "text_encoder"):
            value = getattr(self, component)
            allowed = SCHEMES if component == "decoder" else TEXT_ENCODER_SCHEMES
            if value is not None and value not in allowed:
                raise UserError(f"unknown quantize {component} scheme {value!r} (expected one of {', '.join(allowed)}, or null for float)")
        self.targets = list(self.targets)
        for target in self.targets:
            if target not in TARGETS:
                raise UserError(f"unknown quantize target {target!r} (expected {' or '.join(TARGETS)})")
        if not isinstance(self.subset_size, int) or self.subset_size < 1:
            raise UserError(f"quantize subset_size must be a positive integer, got {self.subset_size!r}")
        if self.target_psnr is not None:
            if isinstance(self.target_psnr, bool) or not isinstance(self.target_psnr, (int, float)) or not self.target_psnr > 0:
                raise UserError(f"quantize target_psnr must be a positive number of dB, got {self.target_psnr!r}")
            if self.scheme not in CALIBRATED:
                raise UserError(f"quantize target_psnr needs a calibrated scheme ({' or '.join(CALIBRATED)}), not {self.scheme!r}")
        for name in ("target_samples",) + (("max_float_layers",) if self.max_float_layers is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"quantize {name} must be a positive integer, got {value!r}")
        if self.target is not None and self.target not in EXPORT_TARGETS:
            raise unknown_choice("quantize target", self.target, EXPORT_TARGETS)
        if self.smooth_quant is not None and not 0 <= self.smooth_quant <= 1:
            raise UserError(f"quantize smooth_quant alpha must lie in [0, 1], got {self.smooth_quant!r}")
        for pattern in self.ignored:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"quantize ignored pattern {pattern!r} is not a valid regex: {e}") from None
        return self

    def component_scheme(self, kind: str) -> str | None:
        """The scheme of a pipeline export's graph, by its kind (None: copied as it is)."""
        if kind in ("sampler", "denoiser"):
            return self.scheme
        if kind == "vae_decoder":
            return self.decoder
        if kind.startswith("text_encoder"):
            return self.text_encoder
        return None

    def for_component(self, kind: str) -> "QuantizeConfig | None":
        scheme = self.component_scheme(kind)
        if scheme is None:
            return None
        # The quality target is the sampler's (whose decoder layers it covers too).
        target = {} if kind in TARGETS else {"target_psnr": None, "require_target": False}
        return dataclasses.replace(self, scheme=scheme, denoiser=None, **target)


# ----------------------------------------------------------------------------- the entry point


def quantize_(target, calib, config: QuantizeConfig | None = None, out_dir: str | Path | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Quantizes ``target`` and returns one record per written artifact.

    target  an export folder (sampler.onnx / denoiser.onnx with their sidecars) or one .onnx file;
            the quantized graphs and their sidecars are written into ``out_dir``. (A torch `Denoiser`
            is refused: NNCF's torch backend builds a C++ extension on first use, which did not
            finish within NNCF's time limit on the project's CPU machines; export it first.)
    calib   a `CalibrationSet`, a path to one, or None for the data-free schemes (weights-only, fp16).

    With ``config.target_psnr`` the sampler's record carries ``target`` (reached, met, the layers
    returned to float); a missed target is not an error here: the caller decides (`missed_targets`).
    """
    from calibration import CalibrationSet, load_calibration

    config = (config or QuantizeConfig()).validate()
    if isinstance(calib, (str, Path)):
        calib = load_calibration(calib)
    if config.scheme in CALIBRATED and not isinstance(calib, CalibrationSet):
        raise UserError(f"quantization scheme {config.scheme!r} needs a calibration set (record one with 'compress calibrate')")
    from compress.denoiser import Denoiser

    if isinstance(target, Denoiser):
        raise UserError("quantize_ works on exported ONNX graphs: export the model first ('compress export' or export.onnx_export.export_onnx)")
    if out_dir is None:
        raise UserError("quantize_ needs out_dir for ONNX artifacts")
    target = Path(target)
    pipeline = target.is_dir() and (target / PIPELINE_FILE).is_file()
    artifacts = _find_artifacts(target, config)
    config = _resolve_target(config, artifacts)
    if pipeline:  # every graph of the pipeline, each with its component's scheme
        chosen = list(artifacts)
        configs = {p: config.for_component(s["kind"]) for p, s in artifacts.items()}
        for path, c in configs.items():
            if c is not None and c.scheme in CALIBRATED and not isinstance(calib, CalibrationSet):
                raise UserError(f"{path.name}: scheme {c.scheme!r} needs a calibration set recorded from the pipeline")
    else:
        chosen = [p for p, s in artifacts.items() if s["kind"] in config.targets and (target.is_dir() or p == target)]
        configs = {p: config for p in chosen}
    for path, c in configs.items():
        if c is not None:
            _check_target(c, path, artifacts[path])
    if calib is not None:  # before any long work, and before anything is written
        from calibration import check_calibration_matches

        for path in chosen:
            if artifacts[path]["kind"] in TARGETS:
                check_calibration_matches(calib, artifacts[path]["model"], where=f"{path.name}'s model")
    out_dir = Path(out_dir)
    with staged_files(out_dir, ".quantize-") as stage, WeightStore(stage) as store:
        records, plan = [], {}
        log = progress or (lambda message: None)
        for path in chosen:
            if configs[path] is None:  # a float component of a pipeline: the same graph
                records.append(_copy_artifact(path, stage, store))
            else:
                records.append(_quantize_artifact(path, artifacts[path], artifacts, calib, configs[path], stage, store, plan, log))
        if pipeline:
            _copy_pipeline_files(target, stage, records)
    for r in records:
        r["path"], r["sidecar"] = str(out_dir / r["path"]), str(out_dir / r["sidecar"])
    return records


def missed_targets(records: list[dict]) -> list[str]:
    """The messages of the quality targets the records did not meet."""
    return [f"{Path(r['path']).name}: {r['target']['message']}" for r in records if r.get("target") and r["target"].get("met") is False]


def _copy_artifact(path: Path, stage: Path, store: WeightStore) -> dict:
    size = copy_onnx(path, stage, store)
    shutil.copy2(path.with_suffix(".json"), stage / path.with_suffix(".json").name)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    return {"path": path.name, "format": "onnx", "kind": sidecar["kind"], "scheme": None, "bytes": size,
            "float_bytes": size, "sha256": sha256_of(stage / path.name), "sidecar": path.with_suffix(".json").name}


def _copy_pipeline_files(source: Path, stage: Path, records: list[dict]) -> None:
    """Tokenizers and pipeline.json, so the quantized folder is again a whole pipeline (ONNX files only)."""
    from export.sidecar import record_component_files

    for folder in sorted(p for p in source.iterdir() if p.is_dir() and (p / "tokenizer.json").is_file()):
        shutil.copytree(folder, stage / folder.name)
    info = json.loads((source / PIPELINE_FILE).read_text())
    info["components"] = {}
    (stage / PIPELINE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    record_component_files(stage / PIPELINE_FILE, records)


def _find_artifacts(target: Path, config: QuantizeConfig) -> dict[Path, dict]:
    """{onnx path: its sidecar} for a folder from `compress export`, or for one .onnx file."""
    if target.is_dir():
        kinds = ("sampler", "denoiser") + (PIPELINE_KINDS if (target / PIPELINE_FILE).is_file() else ())
        paths = [p for p in (target / f"{kind}.onnx" for kind in kinds) if p.is_file()]
        if not paths:
            raise UserError(f"{target} holds no sampler.onnx or denoiser.onnx; export the model first with 'compress export'")
    elif target.is_file() and target.suffix == ".onnx":
        paths = [target]
        if target.name == "sampler.onnx" and (target.parent / "denoiser.onnx").is_file():
            paths.append(target.parent / "denoiser.onnx")  # the source of shared scales
    else:
        raise UserError(f"{target} is neither an export folder nor an .onnx file")
    artifacts = {}
    for path in paths:
        sidecar_path = path.with_suffix(".json")
        try:
            sidecar = json.loads(sidecar_path.read_text())
            sidecar["kind"], sidecar["model"]  # noqa: B018  (both are required)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} has no readable sidecar {sidecar_path.name}; quantize artifacts written by 'compress export'") from None
        if sidecar.get("quantization"):
            raise UserError(f"{path} is already quantized ({sidecar['quantization'].get('scheme')}); quantize the float export")
        artifacts[path] = sidecar
    if not any(s["kind"] in config.targets and (target.is_dir() or p == target) for p, s in artifacts.items()):
        raise UserError(f"{target} holds no {' or '.join(config.targets)} graph to quantize")
    return artifacts


def _quantize_artifact(path: Path, sidecar: dict, artifacts: dict, calib, config: QuantizeConfig, stage: Path, store: WeightStore,
                       plan: dict, log) -> dict:
    kind = sidecar["kind"]
    # NNCF reads a graph's external weights where they lie (its external data dir); fp16 and the QNN engine rewrite them in memory.
    weights_dir = (path.parent.resolve() if external_files(path) and config.scheme != "fp16" and _layout(config).engine == "nncf"
                   and not config.split_concat else None)
    model = onnx.load(str(path), load_external_data=weights_dir is None)
    info: dict = {"scheme": config.scheme}
    if config.scheme == "fp16":
        model = _to_fp16_weights(model)
    elif config.scheme in ("int8-weights", "int4-weights"):
        model = _compress_weights(model, config, weights_dir)
    else:
        model, info = _quantize_activations(model, kind, sidecar, path, artifacts, calib, config, weights_dir)
        if config.scheme == "w8a16" and _layout(config).engine == "nncf":  # the QNN engine writes uint16 itself
            model = _activations_to_int16(model)
            _check_runs(model, path.name, "int16 activations (w8a16)")
        if config.target_psnr is not None:
            # Weights of layers returned to float come from here: split as NNCF's input was, so split convs find theirs.
            float_model = split_concat_convs(onnx.load(str(path))) if config.split_concat else onnx.load(str(path))
            model, info["target"] = _meet_target(model, float_model, kind, sidecar, calib, config, plan, log)
        merge_duplicate_quantizers(model)
        # Counted on the file as written: the target search and the merge both remove quantizers.
        for name, count in (("activation_quantizers", _count_activation_quantizers), ("layers_with_per_step_scales", distinct_step_scales)):
            if name in info:
                info[name] = count(model)
    weights = _weight_summary(model)
    quantization = {
        **info,
        "scheme": config.scheme,
        "config": config.to_dict(),
        "weights": weights,
        "float_bytes": onnx_bytes(path),
        "calibration": None if calib is None else {k: calib.header[k] for k in ("sampler", "seed", "counts", "config", "solver")}
        | {"model_hash": calib.header["model"].get("hash"), "timesteps": calib.header["timesteps"]["values"][:64]},
        "engine": _engine(config),
    }
    out_sidecar = {**sidecar, "quantization": quantization}
    # NNCF leaves the shapes its inference recorded; as in the exporter, every runtime infers them, and in an
    # unrolled int8 sampler they were 6% of the file.
    del model.graph.value_info[:]
    drop_default_attributes(model)  # a file exported by another tool, or before the exporter dropped them
    _compact_quantizer_names(model)
    quantization["qdq_layout"] = _emitted_layout(model, config)
    out_sidecar["target"] = target_section(config.target)
    model.producer_name = "diffusion-compress"
    helper.set_model_props(model, {"diffusion_compress.sidecar": json.dumps(out_sidecar)})
    out_path = stage / path.name
    quantization["bytes"] = save_onnx(model, out_path, store)
    onnx.checker.check_model(str(out_path))
    from export.sidecar import write_sidecar

    sidecar_path = write_sidecar(out_path.with_suffix(".json"), {**out_sidecar, "quantization": quantization})
    return {
        "path": out_path.name,
        "format": "onnx",
        "kind": kind,
        "scheme": config.scheme,
        "granularity": info.get("granularity"),
        "bytes": quantization["bytes"],
        "float_bytes": quantization["float_bytes"],
        "sha256": sha256_of(out_path),
        "sidecar": sidecar_path.name,
        "export_target": config.target,
        **{k: v for k, v in info.items() if k not in ("scheme", "granularity")},
    }


# ----------------------------------------------------------------------------- W8A8 through NNCF


def _quantize_activations(model, kind, sidecar, path, artifacts, calib, config: QuantizeConfig, weights_dir: Path | None = None):
    """NNCF on the graph itself; for shared sampler scales, also on the denoiser (or a union)."""
    condition = sidecar.get("conditioning", {}).get("input")
    transformer = _is_transformer(model)
    if kind in ("denoiser", "vae_decoder"):
        items = calib.denoiser_inputs(condition, config.subset_size) if kind == "denoiser" else calib.latent_inputs(config.subset_size)
        quantized, kept = _calibrated_quantize(model, items, config, transformer, bias_correction=True, weights_dir=weights_dir)
        return quantized, {"granularity": "shared", "calibration_inputs": len(items), "activation_quantizers": _count_activation_quantizers(quantized),
                           "float_layers": kept}

    items, scale = _sampler_items(sidecar, calib, config.subset_size)
    quantized, kept = _calibrated_quantize(model, items, config, transformer, bias_correction=False, weights_dir=weights_dir)
    info = {"granularity": config.granularity, "calibration_inputs": len(items), "guidance_scale": scale, "float_layers": kept}
    if config.granularity == "shared":
        source = None
        if config.shared_from == "denoiser":
            denoiser_path = next((p for p, s in artifacts.items() if s["kind"] == "denoiser"), None)
            if denoiser_path is None:
                raise UserError(f"shared scales from the denoiser need denoiser.onnx next to {path.name}; pass the export folder or shared_from='union'")
            denoiser_items = calib.denoiser_inputs(condition, config.subset_size)
            source, _ = _calibrated_quantize(onnx.load(str(denoiser_path)), denoiser_items, config, transformer, bias_correction=False)
            info["denoiser_calibration_inputs"] = len(denoiser_items)
        info.update(share_scales(quantized, source))
        if _layout(config).bias_dtype == "int32":
            _requantize_int32_biases(quantized)
    info["activation_quantizers"] = _count_activation_quantizers(quantized)
    info["layers_with_per_step_scales"] = distinct_step_scales(quantized)
    return quantized, info


def _sampler_items(sidecar: dict, calib, limit: int) -> tuple[list[dict], float | None]:
    """Feed dicts of sampler.onnx from the set's trajectory starts, and the guidance scale they use."""
    condition = sidecar.get("conditioning", {}).get("input")
    guidance = sidecar.get("guidance", {})
    scale = calib.guidance_scale if calib.guidance_scale is not None else guidance.get("default_scale")
    scale = scale if guidance.get("enabled") else None
    negative = f"negative_{condition}" if condition and any(i["name"] == f"negative_{condition}" for i in sidecar["inputs"]) else None
    return calib.sampler_inputs(condition, scale, limit, negative_name=negative), scale


TARGET_NOISE_SEED = 1234  # the target is measured on noise the calibration did not see


def _meet_target(model, float_model, kind: str, sidecar: dict, calib, config: QuantizeConfig, plan: dict, log) -> tuple[onnx.ModelProto, dict]:
    """Returns the graph with the layers the quality target needs back in float, and what was done.

    The sampler is searched (on fresh noise, the final sample against the float sampler's); a
    denoiser exported beside it gets the same layers, since both graphs share their layer names."""
    from compress.precision import INT8_WEIGHTS_KEPT, quantized_layers, quantized_steps, revert_layers, search_float_layers

    if kind == "denoiser" and "layers" in plan:
        present = set(quantized_layers(model))
        layers = [x for x in plan["layers"] if x in present]
        keep_weights = plan.get("precision") == INT8_WEIGHTS_KEPT
        return (revert_layers(model, layers, float_model, keep_int8_weights=keep_weights),
                {"target_psnr": config.target_psnr, "from": "sampler", "float_layers": layers, "precision": plan.get("precision")})
    if kind == "sampler":
        starts, _ = _sampler_items(sidecar, calib, None)
        rng = np.random.default_rng(TARGET_NOISE_SEED)
        # Fresh noise for every draw; the conditions (labels, prompts) cycle through the set's own.
        items = [{**starts[k % len(starts)], "noise": rng.standard_normal(starts[0]["noise"].shape).astype(np.float32)}
                 for k in range(config.target_samples)]
        width = sidecar["outputs"][0].get("range")
        data_range = None if width is None else float(width[1] - width[0])
    else:
        items = calib.denoiser_inputs(sidecar.get("conditioning", {}).get("input"), None)[-config.target_samples:]
        data_range = None  # a prediction has no fixed range: the reference's own peak-to-peak
    budget = config.max_float_layers or max(1, math.ceil((len(quantized_layers(model)) + len(quantized_steps(model))) / 4))
    result = search_float_layers(model, float_model, items, config.target_psnr, data_range, budget, log)
    log(result.message())
    plan["layers"], plan["precision"] = [x["layer"] for x in result.float_layers], result.precision
    return result.model, {**result.describe(), "message": result.message(), "measured_on": f"{len(items)} {'fresh noise draws' if kind == 'sampler' else 'calibration states'}"}


def _nncf_quantize(model: onnx.ModelProto, items: list[dict], config: QuantizeConfig, transformer: bool, bias_correction: bool,
                   weights_dir: Path | None = None):
    """NNCF's W8A8, then int8 storage of the large non-weight constants; returns (model, the layers kept float and why).
    ``weights_dir``: where the model's external weights are (NNCF reads them there; the result holds its own)."""
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    if not items:
        raise UserError("the calibration set is empty")
    _quiet_nncf()
    if config.split_concat:
        model = split_concat_convs(model)
    alpha = config.smooth_quant if config.smooth_quant is not None else (0.8 if transformer else 0)
    advanced = AdvancedQuantizationParameters(disable_bias_correction=not bias_correction,
                                              backend_params={} if weights_dir is None else {BackendParameters.EXTERNAL_DATA_DIR: str(weights_dir)})
    advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=alpha if alpha > 0 else -1)  # NNCF's -1: off
    preset = nncf.QuantizationPreset.MIXED if config.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    reasons = float_nodes(model, config)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(items),
        preset=preset,
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(names=list(reasons), validate=False),
        advanced_parameters=advanced,
        target_device=nncf.TargetDevice[_layout(config).nncf_target_device],
    )
    if config.fuse_outputs:
        quantize_conv_outputs(quantized, items[:OUTPUT_CALIBRATION_ITEMS])
    quantize_constants(quantized, keep={n for n, r in reasons.items() if r != "conditioning path"},
                       conditioning={n for n, r in reasons.items() if r == "conditioning path"})
    kept = summarize_layers({n: r for n, r in reasons.items() if r != "outside the network"}, quantized)
    return activations_to_uint8(quantized), kept


OUTPUT_CALIBRATION_ITEMS = 16


def quantize_conv_outputs(model: onnx.ModelProto, items: list[dict]) -> int:
    """Adds an output quantizer (min-max over ``items``) to int8 convs whose output only feeds float ops.

    onnxruntime runs DQ -> Conv -> Q as one QLinearConv; a conv whose output goes straight to a
    float op (GroupNorm, or a resnet's conv1 once the sampler has folded the time embedding into
    its bias) has no Q after it and runs as a float conv on dequantized weights: slower than
    float32. Returns how many outputs were quantized.
    """
    import onnxruntime as ort

    graph = model.graph
    producer, readers = producers(graph), consumers(graph)
    outputs = {o.name for o in graph.output}
    int8_convs = [n for n in graph.node if n.op_type == "Conv" and n.output[0] not in outputs and readers.get(n.output[0])
                  and all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    targets = []
    inits = {t.name: t for t in graph.initializer}
    for conv in int8_convs:
        users = readers[conv.output[0]]
        quantizers = [u for u in users if u.op_type == "QuantizeLinear"]
        if not quantizers:
            targets.append(conv)
            continue
        quantizer = quantizers[0]
        if len(quantizers) > 1:  # one Q per consumer (NNCF does that): merge them into one over the union of their ranges
            params = [(numpy_helper.to_array(inits[q.input[1]]), numpy_helper.to_array(inits[q.input[2]])) for q in quantizers]
            if len({z.dtype for _, z in params}) == 1 and all(s.ndim == 0 for s, _ in params):
                ranges = [_range(sc, z) for sc, z in params]
                scale, zp = _params_for_range(min(r[0] for r in ranges), max(r[1] for r in ranges), params[0][1].dtype,
                                              symmetric=all(int(z) == 0 for _, z in params) and np.iinfo(params[0][1].dtype).min < 0)
                base = conv.name + "/merged"
                graph.initializer.extend([numpy_helper.from_array(scale, base + "_scale"), numpy_helper.from_array(zp, base + "_zp")])
                quantizer.input[1], quantizer.input[2] = base + "_scale", base + "_zp"
                for other in quantizers[1:]:
                    for dq in readers.get(other.output[0], []):
                        dq.input[0] = quantizer.output[0]
                    graph.node.remove(other)
                for dq in (d for q in quantizers for d in readers.get(q.output[0], []) if d.op_type == "DequantizeLinear"):
                    dq.input[1], dq.input[2] = base + "_scale", base + "_zp"
                readers[quantizer.output[0]] = [d for q in quantizers for d in readers.get(q.output[0], [])]
                users = [u for u in users if u not in quantizers[1:]]
        # Already quantized for some consumers: the float ones read its dequantized value too, so the conv's only consumer is a Q.
        dq = next((d for d in readers.get(quantizer.output[0], []) if d.op_type == "DequantizeLinear"), None)
        for user in users:
            if user.op_type != "QuantizeLinear" and dq is not None:
                for j, i in enumerate(user.input):
                    if i == conv.output[0]:
                        user.input[j] = dq.output[0]
    drop_unused_initializers(model)
    if not targets or not items:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in targets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [n.output[0] for n in targets]
    lo, hi = np.full(len(names), np.inf), np.full(len(names), -np.inf)
    for item in items:
        for k, value in enumerate(session.run(names, item)):
            lo[k], hi[k] = min(lo[k], float(value.min())), max(hi[k], float(value.max()))
    added = {}
    for k, conv in enumerate(targets):
        scale, zp = _params_for_range(lo[k], hi[k], np.uint8, symmetric=False)
        base = conv.name + "/out"
        graph.initializer.extend([numpy_helper.from_array(scale, base + "_scale"), numpy_helper.from_array(zp, base + "_zp")])
        tensor = conv.output[0]
        added[conv.name] = [
            helper.make_node("QuantizeLinear", [tensor, base + "_scale", base + "_zp"], [tensor + "_oq"], name=base + "/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [tensor + "_oq", base + "_scale", base + "_zp"], [tensor + "_odq"], name=base + "/DequantizeLinear"),
        ]
        for user in readers[tensor]:
            for j, i in enumerate(user.input):
                if i == tensor:
                    user.input[j] = tensor + "_odq"
    nodes = []
    for n in graph.node:
        nodes.append(n)
        nodes.extend(added.get(n.name, []))
    del graph.node[:]
    graph.node.extend(topological(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return len(targets)


def _is_transformer(model: onnx.ModelProto) -> bool:
    return any(re.search(r"(^|/)transformer/", n.name) for n in model.graph.node[:200])


def float_nodes(model: onnx.ModelProto, config: QuantizeConfig) -> dict[str, str]:
    """{node name: reason} for the nodes NNCF must leave in float.

    Everything outside the network (the solver's arithmetic on the state, guidance mixing,
    output scaling: nodes with no module path), what the graph's structure keeps float (first and
    last layers, the conditioning path), the MatMul that reads softmax probabilities, the
    configured patterns, and (elementwise=False) every add and multiply.
    """
    patterns = [re.compile(p) for p in config.ignored]
    producer = producers(model.graph)
    reasons = structural_float_nodes(model) if config.default_ignored else {}
    decoder_float = config.decoder != config.scheme  # a sampler with the VAE decoder baked in: the decoder's own scheme
    for node in model.graph.node:
        path = module_path(node.name)
        if not inside_network(node.name) or (decoder_float and node.name.startswith(DECODER_SCOPE)):
            reasons[node.name] = "outside the network"
        elif any(p.search(path) for p in patterns):
            reasons[node.name] = "ignored pattern"
        elif config.keep_softmax and node.op_type == "MatMul" and any(_source_op(producer, i) == "Softmax" for i in node.input):
            reasons[node.name] = "attention probabilities"
        elif not config.elementwise and node.op_type in ("Add", "Sub", "Mul", "Div"):
            reasons[node.name] = "elementwise"
    return reasons


def quantize_constants(model: onnx.ModelProto, keep: set[str], conditioning: set[str] = frozenset()) -> int:
    """Stores large float constants read by non-conv/linear ops inside the network (normalization
    affine maps, embedding tables) as uint8 behind a DequantizeLinear, asymmetric per row of the last
    axis: a LayerNorm gain lies in [0.4, 2], where a symmetric grid would waste half its levels (on a
    LayerNorm-over-(C,H,W) DDPM, per-row asymmetric kept 33 dB where per-channel symmetric kept 28).
    The weights of the conditioning path's linears (the timestep MLP, whose activations stay float)
    are stored the same way. Constants read by a node in ``keep`` stay float. Returns the bytes saved."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            if i in inits:
                readers.setdefault(i, []).append(n)
    saved, nodes = 0, []
    for name, users in readers.items():
        t = inits[name]
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < CONSTANT_MIN_ELEMENTS or len(t.dims) < 2:
            continue
        if any(u.name in keep or not inside_network(u.name) or u.op_type in ("QuantizeLinear", "DequantizeLinear") for u in users):
            continue
        if any(u.op_type in WEIGHTED_OPS and u.name not in conditioning for u in users):
            continue  # NNCF's to quantize (or a layer kept float on purpose)
        value = numpy_helper.to_array(t)
        rows = value.reshape(-1, value.shape[-1])
        lo, hi = np.minimum(rows.min(axis=1), 0), np.maximum(rows.max(axis=1), 0)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        q = np.clip(np.round(rows / scale[:, None]) + zero[:, None], 0, 255).astype(np.uint8)
        base = f"{users[0].name.rsplit('/', 1)[0]}/{name}"
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(q, name + ".u8"), numpy_helper.from_array(scale, name + ".scale"),
                                  numpy_helper.from_array(zero, name + ".zp"), numpy_helper.from_array(np.array(value.shape, np.int64), name + ".shape")])
        nodes += [helper.make_node("DequantizeLinear", [name + ".u8", name + ".scale", name + ".zp"], [name + ".rows"], name=base + "/DequantizeLinear", axis=0),
                  helper.make_node("Reshape", [name + ".rows", name + ".shape"], [name], name=base + "/Reshape")]
        saved += value.nbytes - q.nbytes - 5 * scale.size
    if nodes:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes + existing)
    return saved


def _source_op(producer: dict, tensor: str) -> str | None:
    """The op behind ``tensor``, looking through shape-only ops."""
    node = producer.get(tensor)
    while node is not None and node.op_type in ("Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze"):
        node = producer.get(node.input[0])
    return None if node is None else node.op_type


# ----------------------------------------------------------------------------- skip-connection splitting


def split_concat_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv(Concat(a, b, axis=1), W, B) -> Conv(a, W[:, :Ca], B) + Conv(b, W[:, Ca:]): exact in float.

    A UNet's up blocks concatenate the upsampled features with the skip connection, two tensors of
    very different ranges; a quantizer on the concat would cover both with one scale. After the
    split each half has its own input quantizer. Split weights are made once per weight and shared
    by every unrolled step.
    """
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    channels = {}
    for v in list(graph.value_info) + list(graph.input):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            channels[v.name] = dims[1].dim_value
    inits = {i.name: i for i in graph.initializer}
    producer = producers(graph)
    made: dict[tuple, tuple[str, str]] = {}
    new_nodes = []
    for node in graph.node:
        concat = producer.get(node.input[0]) if node.op_type == "Conv" else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or node.input[1] not in inits
                or attrs.get("group", 1) != 1 or {a.name: helper.get_attribute_value(a) for a in concat.attribute}.get("axis") not in (1, -3)
                or not all(i in channels for i in concat.input)):
            new_nodes.append(node)
            continue
        ca = channels[concat.input[0]]
        key = (node.input[1], ca)
        if key not in made:
            w = numpy_helper.to_array(inits[node.input[1]])
            names = (f"{node.input[1]}.a{ca}", f"{node.input[1]}.b{ca}")
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w[:, :ca]), names[0]),
                                      numpy_helper.from_array(np.ascontiguousarray(w[:, ca:]), names[1])])
            made[key] = names
        wa, wb = made[key]
        out = node.output[0]
        conv_a = helper.make_node("Conv", [concat.input[0], wa] + list(node.input[2:3]), [out + ".a"], name=node.name + "/a")
        conv_b = helper.make_node("Conv", [concat.input[1], wb], [out + ".b"], name=node.name + "/b")
        for conv in (conv_a, conv_b):
            conv.attribute.extend(node.attribute)
        new_nodes += [conv_a, conv_b, helper.make_node("Add", [out + ".a", out + ".b"], [out], name=node.name + "/sum")]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    drop_unused_initializers(model)
    return model


# ----------------------------------------------------------------------------- per-step and shared scales


@dataclass
class _Quantizer:
    node: onnx.NodeProto  # the QuantizeLinear
    dequantizers: list  # its DequantizeLinear nodes
    key: tuple  # the layers it feeds, without step prefixes
    step: int | None


def activation_quantizers(model: onnx.ModelProto) -> list[_Quantizer]:
    """QuantizeLinear nodes on activations (not weights), each keyed by the layer inputs it feeds."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    uses = input_uses(graph)
    found = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = [n for n, _ in uses.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
        users = [(n, j) for dq in dqs for n, j in uses.get(dq.output[0], [])]
        key = tuple(sorted((module_path(n.name), j) for n, j in users))
        steps = {int(m.group(1)) for n, _ in users if (m := STEP_PREFIX.match(n.name))}
        found.append(_Quantizer(q, dqs, key, min(steps) if steps else None))
    return found


def _count_activation_quantizers(model) -> int:
    return len(activation_quantizers(model))


def _params(model, q: _Quantizer) -> tuple[np.ndarray, np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return numpy_helper.to_array(inits[q.node.input[1]]), numpy_helper.to_array(inits[q.node.input[2]])


def _set_params(model, q: _Quantizer, scale: np.ndarray, zero_point: np.ndarray) -> None:
    """Gives q (and its dequantizers) their own scale and zero point initializers."""
    base = f"{q.node.name}_shared"
    tensors = [numpy_helper.from_array(np.asarray(scale, dtype=np.float32), base + "_scale"), numpy_helper.from_array(np.asarray(zero_point), base + "_zp")]
    # Shared scales and then int16 activations both set q's parameters: the second replaces the first,
    # else two initializers of one name (uint8 and int16) made the w8a16 shared sampler unloadable.
    for t in model.graph.initializer:
        for new in tensors:
            if t.name == new.name:
                t.CopyFrom(new)
                tensors.remove(new)
                break
    model.graph.initializer.extend(tensors)
    for node in [q.node, *q.dequantizers]:
        node.input[1], node.input[2] = base + "_scale", base + "_zp"


def _range(scale, zp) -> tuple[float, float]:
    info = np.iinfo(zp.dtype)
    s, z = float(scale), float(zp)
    return (info.min - z) * s, (info.max - z) * s


def _params_for_range(lo: float, hi: float, dtype, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    info = np.iinfo(dtype)
    if symmetric:
        return np.float32(max(-lo / -info.min, hi / info.max, 1e-12)), np.zeros((), dtype)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (info.max - info.min), 1e-12)
    return np.float32(scale), np.asarray(np.clip(np.round(info.min - lo / scale), info.min, info.max), dtype=dtype)


def per_step_scales(model) -> dict[tuple, dict[int, float]]:
    """{layer key: {step: scale}} for the activation quantizers of an unrolled sampler."""
    out: dict[tuple, dict[int, float]] = {}
    for q in activation_quantizers(model):
        if q.step is not None:
            out.setdefault(q.key, {})[q.step] = float(_params(model, q)[0])
    return out


def distinct_step_scales(model) -> int:
    """How many layers have a different activation scale in at least two steps."""
    return sum(1 for steps in per_step_scales(model).values() if len(set(steps.values())) > 1)


def share_scales(sampler: onnx.ModelProto, denoiser: onnx.ModelProto | None) -> dict:
    """One scale per layer for every step: the denoiser's where it has the layer, else the union of ranges."""
    groups: dict[tuple, list[_Quantizer]] = {}
    for q in activation_quantizers(sampler):
        groups.setdefault(q.key, []).append(q)
    reference = {q.key: _params(denoiser, q) for q in activation_quantizers(denoiser)} if denoiser is not None else {}
    from_denoiser = from_union = 0
    for key, members in groups.items():
        params = [_params(sampler, q) for q in members]
        if key in reference and reference[key][1].dtype == params[0][1].dtype:
            scale, zp = reference[key]
            from_denoiser += len(members)
        else:
            ranges = [_range(s, z) for s, z in params]
            symmetric = all(int(z) == 0 for _, z in params) and np.iinfo(params[0][1].dtype).min < 0
            scale, zp = _params_for_range(min(r[0] for r in ranges), max(r[1] for r in ranges), params[0][1].dtype, symmetric)
            from_union += len(members)
        for q in members:
            _set_params(sampler, q, scale, zp)
    drop_unused_initializers(sampler)
    return {"shared_from": "denoiser" if denoiser is not None else "union",
            "quantizers_from_denoiser": from_denoiser, "quantizers_from_union": from_union}


# ----------------------------------------------------------------------------- w8a16, weight-only, fp16


def activations_to_uint8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Moves int8 activation quantizers to uint8 (zero point + 128): the same grid, so the same numbers.

    onnxruntime's x86 kernels take uint8 activations with int8 weights. From NNCF's int8
    activations it converts some Q/DQ pairs to uint8 and not others, and a conv between a converted
    and an unconverted pair stays a float conv on dequantized tensors (13 of the 77 convs of the
    CIFAR-10 UNet, 20% of its int8 run time). With every activation uint8 from the start, all of
    them fuse into QLinearConv.
    """
    inits = {t.name: t for t in model.graph.initializer}
    weight_zps = {n.input[2] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(n.input) > 2}
    zero_points, retyped = set(), set()
    for q in activation_quantizers(model):
        if len(q.node.input) > 2 and q.node.input[2] not in weight_zps:
            zero_points.add(q.node.input[2])
            retyped.add(q.node.output[0])
    for name in zero_points:
        zp = numpy_helper.to_array(inits[name])
        if zp.dtype == np.int8:
            inits[name].CopyFrom(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
    # Recorded int8 types of the quantized tensors would now contradict the graph.
    keep = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return model


def _activations_to_int16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every activation quantizer keeps its range but gets 16 bits (com.microsoft Q/DQ run int16 on onnxruntime)."""
    for q in activation_quantizers(model):
        scale, zp = _params(model, q)
        lo, hi = _range(scale, zp)
        symmetric = int(zp) == 0 and np.iinfo(zp.dtype).min < 0
        scale16, zp16 = _params_for_range(lo, hi, np.int16, symmetric)
        _set_params(model, q, scale16, zp16)
        for node in [q.node, *q.dequantizers]:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    drop_unused_initializers(model)
    return model


def _check_runs(model: onnx.ModelProto, name: str, what: str) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"onnxruntime {ort.__version__} (CPUExecutionProvider) cannot run {name} with {what}: {str(e).splitlines()[0][:200]}") from None


def _compress_weights(model: onnx.ModelProto, config: QuantizeConfig, weights_dir: Path | None = None) -> onnx.ModelProto:
    """nncf.compress_weights: int8 per-channel everywhere, or int4 (opset 21) for MatMul/Gemm with int8 convs.
    ``weights_dir``: where the model's external weights are (loaded one layer at a time; the result holds its own)."""
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters

    _quiet_nncf()
    # Weight noise alone is small: only the user's own patterns stay float here, not the activation defaults.
    scope = nncf.IgnoredScope(names=[n.name for n in model.graph.node if any(re.search(p, module_path(n.name)) for p in config.ignored)], validate=False)
    external = {} if weights_dir is None else {"advanced_parameters": nncf.AdvancedCompressionParameters(
        backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(weights_dir)})}
    if config.scheme == "int8-weights":
        out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM, ignored_scope=scope, **external)
    else:
        from onnx import version_converter

        model = version_converter.convert_version(model, 21)  # int4 DequantizeLinear is opset 21
        out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=-1, ratio=1.0,
                                    all_layers=True, ignored_scope=scope, **external)
    _flatten_per_axis_scales(out)
    quantize_constants(out, keep=set(scope.names))
    _check_runs(out, "the model", f"{config.scheme} weights")
    return out


def _flatten_per_axis_scales(model: onnx.ModelProto) -> None:
    """NNCF writes conv weight scales as [C, 1, 1]; per-axis DequantizeLinear needs them 1-D."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not any(a.name == "axis" for a in node.attribute):
            continue
        for name in node.input[1:3]:
            t = inits.get(name)
            if t is not None and len(t.dims) > 1:
                flat = numpy_helper.to_array(t).reshape(-1)
                t.CopyFrom(numpy_helper.from_array(flat, name))


def _to_fp16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float weights stored as float16, each read through a Cast to float32 (folded by the runtime at load)."""
    graph = model.graph
    big = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 16]
    casts = []
    for t in big:
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + ".fp16")
        t.CopyFrom(half)
        casts.append(helper.make_node("Cast", [t.name], [t.name[: -len(".fp16")]], name=f"cast_{len(casts)}", to=onnx.TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model


# ----------------------------------------------------------------------------- export targets (QDQ layouts)


def _layout(config: QuantizeConfig):
    from export.targets import get_target

    return get_target(config.target or "generic").qdq


def _layout_scheme(layout) -> str:
    """The calibrated scheme a target's layout is: its activations' width."""
    return "w8a16" if layout.activation_dtype in ("uint16", "int16") else "w8a8"


def _resolve_target(config: QuantizeConfig, artifacts: dict) -> QuantizeConfig:
    """The config with its target named: the one given, else the one the export's sidecars record, else generic."""
    if config.target is not None:
        return config
    recorded = {s["target"]["name"] for s in artifacts.values() if isinstance(s.get("target"), dict) and s["target"].get("name")}
    if len(recorded) > 1:
        raise UserError(f"the export's sidecars record different targets ({', '.join(sorted(recorded))}); name one with --target")
    return dataclasses.replace(config, target=recorded.pop() if recorded else "generic")


def _check_target(config: QuantizeConfig, path: Path, sidecar: dict) -> None:
    """Refuses, before any work, a graph or a scheme the target's provider would not take."""
    from export.targets import get_target

    target = get_target(config.target)
    if target.name == "generic":
        return
    if target.static_batch and sidecar.get("batch", {}).get("dynamic", False):
        raise UserError(f"{path.name} has a dynamic batch, and target {target.name} compiles one static graph: "
                        f"export it with --target {target.name} (or --batch-size N)")
    layout, needed = target.qdq, _layout_scheme(target.qdq)
    if config.scheme != needed:
        other = next((t for t in ("npu-qnn", "npu-qnn-w8a16") if t != target.name and _layout_scheme(get_target(t).qdq) == config.scheme), None)
        hint = f", or target {other}" if other and layout.engine == "onnxruntime-qnn" else ""
        raise UserError(f"{path.name}: target {target.name} takes {layout.activation_dtype} activations with {layout.weight_dtype} weights; "
                        f"scheme {config.scheme!r} is not that: quantize with --scheme {needed}{hint}")
    if config.preset != layout.nncf_preset and layout.engine == "nncf":
        raise UserError(f"target {target.name} takes asymmetric activations; preset {config.preset!r} makes them symmetric (use preset 'mixed')")
    if layout.engine == "onnxruntime-qnn" and config.smooth_quant is not None:
        raise UserError(f"target {target.name} is quantized by onnxruntime's QNN tooling, which has no SmoothQuant here; drop smooth_quant")


def _engine(config: QuantizeConfig) -> str:
    if config.scheme == "fp16":
        return "diffusion-compress"
    if config.scheme in CALIBRATED and _layout(config).engine == "onnxruntime-qnn":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} (quantization.execution_providers.qnn)"
    return f"nncf {_nncf_version()}"


def _calibrated_quantize(model: onnx.ModelProto, items: list[dict], config: QuantizeConfig, transformer: bool, bias_correction: bool,
                         weights_dir: Path | None = None):
    """W8A8 / W8A16 by the target's engine; returns (model, the layers kept float and why)."""
    layout = _layout(config)
    if layout.engine == "onnxruntime-qnn":
        return _qnn_quantize(model, items, config, layout)
    return _nncf_quantize(model, items, config, transformer, bias_correction, weights_dir)


# What stays float for a QNN target: of compress.precision's reasons, those that are not about accuracy.
QNN_FLOAT_REASONS = ("outside the network", "ignored pattern", "elementwise")


class _FeedReader:
    """onnxruntime's CalibrationDataReader over the feed dicts NNCF would get."""

    def __init__(self, items: list[dict]):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def _qnn_quantize(model: onnx.ModelProto, items: list[dict], config: QuantizeConfig, layout):
    """onnxruntime's QNN tooling on the graph: qnn_preprocess_model's fusions, then quantize_static with
    get_qnn_qdq_config, which quantizes every op but Cast (QNN HTP runs no float op: one would fall
    back to the CPU) and adds QNN's overrides (fixed 16-bit Sigmoid/Tanh output scales, per-tensor
    MatMul weights). For the same reason the layers compress.precision keeps float for accuracy (first
    and last layers, conditioning path, attention probabilities) are quantized here: what stays float
    is the solver's arithmetic and what the config names (``ignored``, ``elementwise=False``; a
    ``target_psnr`` returns layers afterwards), and on QNN that runs on the CPU between steps."""
    import logging

    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    if not items:
        raise UserError("the calibration set is empty")
    if config.split_concat:
        model = split_concat_convs(model)
    types = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16, "int8": QuantType.QInt8}
    root = logging.getLogger()
    # onnxruntime's quantizer warns through the root logger (one line per weight); a handler keeps it from configuring one.
    quiet, level = logging.NullHandler(), root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="compress-qnn-") as scratch:
            source = Path(scratch) / "float.onnx"
            # onnxruntime 1.32's qnn_preprocess_model fails on a model with metadata_props (it updates a dict with
            # the repeated field); and given a ModelProto it leaves that proto's weights pointing into its deleted
            # temporary folder, so it gets a path.
            del model.metadata_props[:]
            onnx.save_model(model, str(source))
            if qnn_preprocess_model(str(source), str(Path(scratch) / "fused.onnx")):
                source = Path(scratch) / "fused.onnx"
            model = onnx.load(str(source))
            reasons = {n: r for n, r in float_nodes(model, config).items() if r in QNN_FLOAT_REASONS}
            qnn_config = get_qnn_qdq_config(model, _FeedReader(items), activation_type=types[layout.activation_dtype],
                                            weight_type=types[layout.weight_dtype], per_channel=layout.weight_per_channel,
                                            activation_symmetric=layout.activation_symmetric, weight_symmetric=layout.weight_symmetric,
                                            nodes_to_exclude=list(reasons) or None)
            quantize(str(source), str(Path(scratch) / "qdq.onnx"), qnn_config)
            quantized = onnx.load(str(Path(scratch) / "qdq.onnx"))
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)
    quantize_constants(quantized, keep=set(reasons))
    kept = summarize_layers({n: r for n, r in reasons.items() if r != "outside the network"}, quantized)
    return quantized, kept


def _requantize_int32_biases(model: onnx.ModelProto) -> int:
    """Shared scales change the input scale of layers whose int32 bias was scaled by the old one; QNN
    takes bias scale = input scale x weight scale, so each such bias is requantized. Returns how many."""
    from export.targets import BIAS_INPUT

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = producers(graph)
    changed = 0
    for node in graph.node:
        j = BIAS_INPUT.get(node.op_type)
        if j is None or len(node.input) <= j:
            continue
        act, weight, bias = (producer.get(node.input[k]) for k in (0, 1, j))
        if any(d is None or d.op_type != "DequantizeLinear" for d in (act, weight, bias)) or bias.input[0] not in inits:
            continue
        if inits[bias.input[0]].data_type != onnx.TensorProto.INT32:
            continue
        scale = (numpy_helper.to_array(inits[act.input[1]]) * numpy_helper.to_array(inits[weight.input[1]])).astype(np.float32)
        old = numpy_helper.to_array(inits[bias.input[1]])
        if np.array_equal(scale, old):
            continue
        value = numpy_helper.to_array(inits[bias.input[0]]).astype(np.float64) * old
        info = np.iinfo(np.int32)
        q = np.clip(np.round(value / scale), info.min, info.max).astype(np.int32)
        base = f"{node.name}/bias_shared"
        graph.initializer.extend([numpy_helper.from_array(q, base + "_q"), numpy_helper.from_array(scale.reshape(old.shape), base + "_scale")])
        bias.input[0], bias.input[1] = base + "_q", base + "_scale"
        changed += 1
    drop_unused_initializers(model)
    return changed


def _emitted_layout(model: onnx.ModelProto, config: QuantizeConfig) -> dict:
    """The QDQ layout the graph has, read from its Q/DQ nodes, with where it departs from the target's.
    An NPU target's provider takes no other layout, so a departure there is an error of this code."""
    from export.targets import get_target, read_qdq_layout

    target = get_target(config.target)
    emitted = read_qdq_layout(model)
    # The target's layout describes its calibrated scheme; weight-only and fp16 files have no such layout.
    departures = target.qdq.mismatches(emitted) if config.scheme == _layout_scheme(target.qdq) else None
    if departures and target.name != "generic":
        raise RuntimeError(f"the quantized graph does not have target {target.name}'s QDQ layout: {'; '.join(departures)}")
    return {**emitted, "target": target.name, "departures_from_target": departures}


# ----------------------------------------------------------------------------- helpers


def merge_duplicate_quantizers(model: onnx.ModelProto) -> int:
    """One Q/DQ pair per (tensor, scale, zero point): NNCF quantizes a tensor once per consumer, and
    where the consumers' scales agree (the halves of a split conv, the branches reading one input) the
    copies compute the same thing: in an unrolled sampler they were a fifth of the pairs. onnxruntime
    gives each consumer its own DQ again when it fuses (EnsureUniqueDQForNodeUnit). Returns the pairs removed."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)

    def value(name: str) -> bytes:
        t = inits.get(name)
        return b"" if t is None else bytes(t.data_type.to_bytes(1, "little")) + numpy_helper.to_array(t).tobytes()

    seen: dict[tuple, str] = {}  # (input, scale, zero point, attributes) -> the kept DQ's output
    renamed: dict[str, str] = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(readers.get(q.output[0], [])) != 1:
            continue
        dq = readers[q.output[0]][0]
        if dq.op_type != "DequantizeLinear" or list(dq.input[1:]) != list(q.input[1:]) or any(i not in inits for i in q.input[1:]):
            continue
        key = (q.input[0], *(value(i) for i in q.input[1:]), tuple(a.SerializeToString() for a in q.attribute),
               tuple(a.SerializeToString() for a in dq.attribute))
        if key in seen:
            renamed[dq.output[0]] = seen[key]
        else:
            seen[key] = dq.output[0]
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i in renamed:
                n.input[j] = renamed[i]
    if renamed:
        drop_dead_nodes(model)
    return len(renamed)


def _compact_quantizer_names(model: onnx.ModelProto) -> None:
    """Short names for Q/DQ nodes, their outputs and their scale / zero-point constants: an unrolled
    sampler holds one pair per layer and step, and NNCF's long names were a third of a small model's file."""
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}
    for k, n in enumerate(x for x in graph.node if x.op_type in ("QuantizeLinear", "DequantizeLinear")):
        n.name = f"q{k}"
        for j, out in enumerate(n.output):
            if out not in keep:
                renamed[out] = n.output[j] = f"q{k}_{j}"
        for i in n.input[1:]:
            renamed.setdefault(i, f"k{len(renamed)}")
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i in renamed:
                n.input[j] = renamed[i]


def _weight_summary(model: onnx.ModelProto) -> dict:
    """Bytes of initializers by dtype: shows that the weights really are integers."""
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64))
        nbytes = count // 2 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else count * dtype.itemsize
        name = helper.tensor_dtype_to_string(t.data_type).removeprefix("TensorProto.").lower()
        out[name] = out.get(name, 0) + nbytes
    return out


def _quiet_nncf() -> None:
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)


def _nncf_version() -> str:
    import nncf

    return nncf.__version__


