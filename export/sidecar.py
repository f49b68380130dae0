"""The JSON sidecar that travels with every exported artifact: its whole interface, for app developers.

One builder per artifact kind, shared by all formats (ONNX, Core ML, OpenVINO): a consumer
reads the input names, shapes, dtypes and value ranges here and never needs this package.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from compress.components import TextEncoder
from compress.denoiser import SHARED_CONDITION_KEYS, Denoiser
from export.sampler_graph import NEGATIVE, DenoiserGraph, SamplerGraph, condition_input, condition_names

SCHEMA = "diffusion-compress/artifact-sidecar/1"
BATCH = "batch"  # the symbolic batch dimension's name, in the sidecar and in the graph
TOKENS = "tokens"  # the symbolic token axis of a text encoder whose prompts and negative prompts differ in length (Sana)


def _batch_dim(batch_size: int | None):
    return BATCH if batch_size is None else int(batch_size)


_TEXT_PARTS = {
    "encoder_hidden_states": "text-encoder hidden states of the prompt",
    "text_embeds": "pooled, projected prompt embedding of the last text encoder (SDXL's added conditioning)",
    "time_ids": "SDXL's added time ids: original height, width, crop top, left, target height, width",
    "pooled_projections": "pooled prompt embedding (SD3: both CLIP encoders' projected pooled outputs, concatenated; FLUX: the CLIP encoder's pooled output)",
    "encoder_attention_mask": "attention mask of the prompt's tokens: 1 for tokens, 0 for padding (the text encoder's attention_mask output; PixArt)",
}
_GUIDANCE = {
    "classifier-free": "classifier-free guidance scale: 0 unconditional, 1 conditional, >1 stronger guidance",
    "embedded": "guidance scale fed to the network's guidance embedding (guidance-distilled, FLUX-dev: FluxPipeline's guidance_scale); "
                "one branch, no negative prompt",
}


def guidance_kind(denoiser: Denoiser) -> str:
    return "embedded" if denoiser.guidance_embedded else "classifier-free"


def _condition_specs(denoiser: Denoiser, batch, negative: bool = False) -> list[dict]:
    """One spec per condition input; ``negative`` gives the unconditional branch's inputs."""
    if denoiser.conditioning != "text":
        spec = _condition_spec(denoiser, batch)
        return [spec] if spec and not negative else []
    shapes, specs = denoiser.condition_shapes(), []
    for name in condition_names(denoiser):
        if negative and name == "time_ids":
            continue
        spec = {"name": NEGATIVE + name if negative else name, "shape": [batch, *shapes[name]], "dtype": "float32",
                "description": _TEXT_PARTS.get(name, name) + (" for the negative prompt (unconditional branch)" if negative else "")}
        if name == "time_ids":
            spec["default"] = "[H, W, 0, 0, H, W] of the output image"
        elif denoiser.null_text is None and denoiser.has_null_condition:
            spec["null_value"] = "zeros"
        specs.append(spec)
    return specs


def _condition_spec(denoiser: Denoiser, batch) -> dict | None:
    name = condition_input(denoiser)
    if denoiser.conditioning == "class":
        return {
            "name": name,
            "shape": [batch],
            "dtype": "int64",
            "range": [0, denoiser.num_classes - 1],
            "null_value": denoiser.num_classes,
            "description": f"class label per sample; {denoiser.num_classes} is the null (unconditional) label",
        }
    if denoiser.conditioning == "text":
        return {
            "name": name,
            "shape": [batch, *denoiser.cond_shape],
            "dtype": "float32",
            "null_value": "zeros",
            "description": "text-encoder hidden states per sample; all zeros is the unconditional embedding",
        }
    return None


def _conditioning(denoiser: Denoiser, guidance: bool) -> dict:
    """How conditioning works, including how to ask for an unconditional sample."""
    info: dict = {"kind": denoiser.conditioning, "input": condition_input(denoiser)}
    if denoiser.conditioning == "class":
        info.update(num_classes=denoiser.num_classes, null_label=denoiser.num_classes)
        info["unconditional"] = f"class_labels = {denoiser.num_classes} (the null label)" + (" or guidance_scale = 0" if guidance else "")
    elif denoiser.conditioning == "text":
        info.update(tokens=denoiser.cond_shape[0], dim=denoiser.cond_shape[1], inputs=condition_names(denoiser))
        if not denoiser.has_null_condition:
            info.update(null_embedding=None, unconditional="not available: the model has no unconditional input")
        elif denoiser.null_text is None:
            info.update(null_embedding="zeros", unconditional="encoder_hidden_states = zeros" + (" or guidance_scale = 0" if guidance else ""))
        else:
            info.update(null_embedding="the encoded negative prompt", unconditional="guidance_scale = 0" if guidance else "not available without guidance")
    return info


def _finite(values) -> list[float]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _sampler_output(graph: SamplerGraph, batch) -> dict:
    denoiser = graph.denoiser
    if graph.decoder is not None:
        return {"name": "image", "shape": [batch, *graph.image_shape], "dtype": "float32", "range": [0.0, 1.0], "clipped": True,
                "layout": "NCHW, RGB", "description": "the decoded image in [0, 1] (multiply by 255 for 8-bit pixels)"}
    if denoiser.space == "latents":
        return {"name": "sample", "shape": [batch, *denoiser.sample_shape], "dtype": "float32", "range": None, "clipped": False,
                "space": "latents", "description": "the final latents, scaled as the denoiser takes them (unbounded); decode them with vae_decoder"}
    return {"name": "sample", "shape": [batch, *denoiser.sample_shape], "dtype": "float32", "range": list(denoiser.data_range), "clipped": False,
            "description": "the generated sample in the model's data range (not clipped)"}


def sampler_sidecar(graph: SamplerGraph, fmt: str, file: str, batch_size: int | None, extra: dict | None = None) -> dict:
    denoiser, solver, table = graph.denoiser, graph.solver, graph.table
    batch = _batch_dim(batch_size)
    shape = [batch, *denoiser.sample_shape]
    inputs = [{
        "name": "noise",
        "shape": shape,
        "dtype": "float32",
        "distribution": "standard_normal",
        "description": "standard normal noise drawn by the caller (any initial scaling happens inside); the same noise gives the same sample",
    }]
    inputs += _condition_specs(denoiser, batch)
    if graph.negative_names:
        inputs += _condition_specs(denoiser, batch, negative=True)
    default_scale = graph.default_guidance_scale
    if graph.guidance:
        inputs.append({
            "name": "guidance_scale",
            "shape": [1],
            "dtype": "float32",
            "default": default_scale,
            "description": _GUIDANCE[guidance_kind(denoiser)],
        })
    return {
        "schema": SCHEMA,
        "kind": "sampler",
        "format": fmt,
        "file": file,
        "inputs": inputs,
        "outputs": [_sampler_output(graph, batch)],
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "data_range": [0.0, 1.0] if graph.decoder is not None else list(denoiser.data_range) if denoiser.space == "pixels" else None,
        "prediction_type": denoiser.prediction_type,
        "solver": {
            "name": solver.name,
            "steps": solver.steps,
            "spacing": solver.spacing,
            "options": dict(solver.options),
            # The rest of the plan's settings, so a runtime can rebuild the same solver (see runtimes/torch_runner.py).
            "plan": {k: getattr(solver, k) for k in PLAN_SETTINGS},
            "timesteps": [float(t) for t in table.timesteps],
            "sigmas": _finite(graph.plan.sigma),
            "nfe": table.evaluations,
            # Guidance runs conditional and unconditional halves as one doubled batch per evaluation.
            "network_batch": "2 x batch" if graph.classifier_free else "batch",
        },
        "guidance": {"enabled": graph.guidance, "kind": guidance_kind(denoiser) if graph.guidance else None, "default_scale": default_scale},
        "conditioning": _conditioning(denoiser, graph.guidance),
        "randomness": "none inside the graph: the caller owns the seed through the noise it passes",
        "model": denoiser.describe(),
        **(extra or {}),
    }


def denoiser_sidecar(graph: DenoiserGraph, fmt: str, file: str, batch_size: int | None, extra: dict | None = None) -> dict:
    denoiser = graph.denoiser
    batch = _batch_dim(batch_size)
    shape = [batch, *denoiser.sample_shape]
    inputs = [
        {"name": "sample", "shape": shape, "dtype": "float32", "description": "noisy sample x_t = alpha_t * x_0 + sigma_t * noise"},
        {"name": "timestep", "shape": [batch], "dtype": "float32", "range": _timestep_range(denoiser.schedule),
         "description": "training timestep of each sample (fractional values allowed)"},
    ]
    inputs += _condition_specs(denoiser, batch)
    if denoiser.guidance_embedded:
        inputs.append({"name": "guidance", "shape": [batch], "dtype": "float32", "description": _GUIDANCE["embedded"] + ", per sample"})
    return {
        "schema": SCHEMA,
        "kind": "denoiser",
        "format": fmt,
        "file": file,
        "inputs": inputs,
        "outputs": [{"name": "prediction", "shape": shape, "dtype": "float32",
                     "description": f"the raw network output ({denoiser.prediction_type}); no guidance, no solver step"}],
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "data_range": list(denoiser.data_range) if denoiser.space == "pixels" else None,
        "prediction_type": denoiser.prediction_type,
        "schedule": _schedule_section(denoiser),
        "conditioning": _conditioning(denoiser, guidance=False),
        "model": denoiser.describe(),
        **(extra or {}),
    }


PLAN_SETTINGS = ("final", "convention", "steps_offset", "timestep_rounding", "lambda_min_clipped")


def _timestep_range(schedule) -> list[int]:
    # A flow's timestep is sigma * T, so pure noise is T itself; VP timesteps index alphas_cumprod.
    return [0, schedule.num_train_timesteps - (0 if schedule.kind == "flow" else 1)]


def _schedule_section(denoiser) -> dict:
    """What a host-side scheduler needs: x_t = alpha_t x_0 + sigma_t noise, spelled out per family."""
    schedule = denoiser.schedule
    section = {**schedule.describe(), "scheduler_config": denoiser.scheduler_config, "fingerprint": schedule.fingerprint()}
    if schedule.kind == "flow":
        section["levels"] = "alpha_t = 1 - t / num_train_timesteps, sigma_t = t / num_train_timesteps"
    else:
        section["levels"] = "alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t])"
        section["alphas_cumprod"] = [float(a) for a in schedule.alphas_cumprod]
    return section


def target_section(name: str) -> dict:
    """The export target every ONNX sidecar (and the OpenVINO IR's, copied from it) records: its static
    shapes, where it is meant to run and the QDQ layout `compress quantize` emits for it."""
    from export.targets import get_target

    return get_target(name).describe()


def write_sidecar(path: Path, sidecar: dict) -> Path:
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


PIPELINE_FILE = "pipeline.json"
PIPELINE_SCHEMA = "diffusion-compress/pipeline/1"
# The file of a component in each format, by its kind.
FORMAT_FILES = {"onnx": "{}.onnx", "openvino": "{}.xml", "coreml": "{}.mlpackage"}


NEGATIVE_TOKENIZER_FILE = "negative_tokenizer.json"


def _tokenizer_info(encoder: TextEncoder) -> dict:
    tok = encoder.tokenizer
    info = {"file": f"{encoder.tokenizer_name}/tokenizer.json", "max_length": encoder.prompt_length, "padding": "max_length",
            "truncation": True, "pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "lowercase": encoder.lowercase,  # done by tokenizer.json's normalizer, as the pipeline does before tokenizing
            "description": "tokenizers.Tokenizer.from_file(file).encode(prompt).ids: already padded and truncated to max_length"}
    if encoder.prefix:
        info.update(prefix=encoder.prefix, negative_file=f"{encoder.tokenizer_name}/{NEGATIVE_TOKENIZER_FILE}", negative_max_length=encoder.max_length,
                    description="file: prompts (its normalizer lowercases and strips the prompt, then puts the prefix before it); "
                                "negative_file: negative prompts (no prefix). encode(text).ids of either is already padded and truncated; "
                                "a prompt that is empty after stripping gets no prefix (the tokenizers library normalizes no empty text)")
    return info


def text_encoder_sidecar(encoder: TextEncoder, fmt: str, file: str, batch_size: int | None) -> dict:
    batch, length = _batch_dim(batch_size), encoder.max_length
    tokens = TOKENS if encoder.prefix else length
    outputs = [{"name": "hidden_states", "shape": [batch, length, encoder.hidden_size], "dtype": "float32",
                "description": "last hidden state after the final norm" if encoder.hidden_layer == -1 else "penultimate hidden state (before the final norm)"}]
    if encoder.pooled:
        outputs.append({"name": "pooled", "shape": [batch, encoder.pooled_size], "dtype": "float32",
                        "description": "the projected pooled output (at the end-of-text token)" if hasattr(encoder.module, "text_projection")
                        else "the pooled output (the final hidden state at the end-of-text token, not projected)"})
    if encoder.attention_mask:
        outputs.append({"name": "attention_mask", "shape": [batch, length], "dtype": "float32",
                        "description": "1 for the prompt's tokens, 0 for padding (input_ids != pad_id); the encoder itself runs with it"})
    return {
        "schema": SCHEMA,
        "kind": encoder.name,
        "format": fmt,
        "file": file,
        "inputs": [{"name": "input_ids", "shape": [batch, tokens], "dtype": "int64", "description": _input_ids_description(encoder)}],
        "outputs": outputs,
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "tokenizer": _tokenizer_info(encoder),
        "model": {"class": type(encoder.module).__name__, "parameters": sum(p.numel() for p in encoder.module.parameters())},
    }


def _input_ids_description(encoder: TextEncoder) -> str:
    name, length = encoder.tokenizer_name, encoder.max_length
    if not encoder.prefix:
        return f"token ids from {name}/tokenizer.json, padded to {length}; longer prompts are truncated"
    return (f"token ids of a prompt from {name}/tokenizer.json ({encoder.prompt_length} tokens: the prefix and the prompt) or of a negative "
            f"prompt from {name}/{NEGATIVE_TOKENIZER_FILE} ({length}); the outputs keep the first token and the last {length - 1}")


def vae_sidecar(graph, kind: str, fmt: str, file: str, batch_size: int | None) -> dict:
    batch = _batch_dim(batch_size)
    vae = graph.module.vae
    image = {"dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW, RGB", "description": "image in [0, 1]"}
    latents = {"dtype": "float32", "range": None, "description": "latents scaled as the denoiser takes them (the sampler's latent output)"}
    (name_in,), (name_out,) = graph.input_names, graph.output_names
    shapes = {name_in: [batch, *graph.input_shape], name_out: [batch, *graph.output_shape]}
    spec = {"image": image, "latents": latents}
    return {
        "schema": SCHEMA,
        "kind": kind,
        "format": fmt,
        "file": file,
        "inputs": [{"name": name_in, "shape": shapes[name_in], **spec[name_in]}],
        "outputs": [{"name": name_out, "shape": shapes[name_out], **spec[name_out]}],
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "scaling": {"scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor, "latents_mean": vae.latents_mean, "latents_std": vae.latents_std,
                    "applied_inside": True},
        "model": {"class": vae.kind, "parameters": sum(p.numel() for p in vae.module.parameters())},
    }


def record_component_files(pipeline_json: Path, records: list[dict]) -> None:
    """Adds each artifact record's file to pipeline.json's components, under its kind and format."""
    data = json.loads(pipeline_json.read_text())
    for r in records:
        data["components"].setdefault(r["kind"], {})[r["format"]] = Path(r["path"]).name
    write_sidecar(pipeline_json, data)


def drop_component_format(pipeline_json: Path, fmt: str) -> None:
    data = json.loads(pipeline_json.read_text())
    for files in data["components"].values():
        files.pop(fmt, None)
    write_sidecar(pipeline_json, data)


def _pooled_input(denoiser: Denoiser) -> str | None:
    """The sampler input that takes the encoders' pooled outputs (SDXL's text_embeds, SD3's pooled_projections)."""
    return next((k for k in (denoiser.added_cond_shapes or {}) if k not in SHARED_CONDITION_KEYS), None)


def pipeline_sidecar(pipeline, sampler: SamplerGraph, batch_size: int | None) -> dict:
    """How the files of a text-to-image export chain from a prompt to an image."""
    denoiser, batch = pipeline.denoiser, _batch_dim(batch_size)
    encoders, layout = pipeline.text_encoders, pipeline.layout
    chain = [{"from": "prompt", "through": e.tokenizer_name, "to": f"{e.name}.input_ids"} for e in encoders]
    channels, sequence = [f"{n}.hidden_states" for n in layout.channels], [f"{n}.hidden_states" for n in layout.sequence]
    op = f"concat(axis=-1) of {', '.join(channels)}" if len(channels) > 1 else "identity"
    if layout.width is not None:
        op += f", zero-padded on the last axis to {layout.width}"
    if sequence:
        op += f", then concat(axis=1) with {', '.join(sequence)}"
    if layout.zero_tokens:
        op += f", then concat(axis=1) with zeros [{batch}, {layout.zero_tokens}, {layout.width or denoiser.cond_shape[1]}]"
    chain.append({"from": channels + sequence, "op": op, "to": "sampler.encoder_hidden_states"})
    pooled = [f"{e.name}.pooled" for e in encoders if e.pooled]
    pooled_input = _pooled_input(denoiser)
    if pooled_input:
        chain.append({"from": pooled, "op": "concat(axis=-1)" if len(pooled) > 1 else "identity", "to": f"sampler.{pooled_input}"})
    if "time_ids" in (denoiser.added_cond_shapes or {}):
        chain.append({"value": [float(v) for v in pipeline.time_ids(1)[0]], "to": "sampler.time_ids", "op": "repeat per sample"})
    masks = [f"{e.name}.attention_mask" for e in encoders if e.attention_mask]
    if masks:
        chain.append({"from": masks, "op": "identity", "to": "sampler.encoder_attention_mask"})
    if sampler.negative_names:
        how = "zeros_like(the prompt's)" if pipeline.force_zeros_for_empty_prompt else "the same chain for the negative prompt"
        through = ", through each tokenizer's negative_file where it has one" if any(e.prefix for e in encoders) else ""
        chain.append({"from": "negative prompt", "op": f"the chain above{through}; with no negative prompt: {how}",
                      "to": [f"sampler.{n}" for n in sampler.negative_names]})
    chain.append({"from": f"standard normal noise {[batch, *denoiser.sample_shape]} (the caller's seed)", "to": "sampler.noise"})
    if sampler.guidance:
        chain.append({"value": [sampler.default_guidance_scale], "to": "sampler.guidance_scale"})
    if sampler.decoder is None:
        chain.append({"from": "sampler.sample", "to": "vae_decoder.latents"})
    return {
        "schema": PIPELINE_SCHEMA,
        "class_name": pipeline.class_name,
        "source": denoiser.source,
        "image": {"shape": [batch, *pipeline.image_shape], "range": [0.0, 1.0], "output": "sampler.image" if sampler.decoder is not None else "vae_decoder.image"},
        "latents": {"shape": [batch, *denoiser.sample_shape]},
        "tokenizers": {e.tokenizer_name: _tokenizer_info(e) for e in encoders},
        # In this order: each prompt is tokenized and encoded by every encoder, hidden states concatenated.
        # Outputs after hidden_states: pooled (if "pooled"), then attention_mask (if "attention_mask").
        "text_encoders": [{"name": e.name, "tokenizer": e.tokenizer_name, "pooled": e.pooled, "attention_mask": e.attention_mask} for e in encoders],
        # How the encoders' hidden_states make sampler.encoder_hidden_states, and which input takes the pooled outputs (concatenated).
        "text_layout": layout.describe(),
        "pooled_input": pooled_input,
        "guidance": {"enabled": sampler.guidance, "kind": guidance_kind(denoiser) if sampler.guidance else None,
                     "default_scale": sampler.default_guidance_scale, "default_negative_prompt": "" if sampler.classifier_free else None,
                     "zeros_for_empty_negative_prompt": pipeline.force_zeros_for_empty_prompt},
        "solver": {"name": sampler.solver.name, "steps": sampler.solver.steps, "nfe": sampler.table.evaluations},
        "components": {},  # kind -> {format: file}, filled in as each format is written
        "chain": chain,
    }
