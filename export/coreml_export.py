"""Core ML writer: `sampler.mlpackage` (the whole few-step sampler) and `denoiser.mlpackage` (the bare network);
for a text-to-image pipeline also `text_encoder*.mlpackage`, `vae_decoder.mlpackage` and `vae_encoder.mlpackage`.

Each graph goes through torch.export and `run_decompositions` to coremltools (ML program,
float16 compute): converting a `torch.jit.trace` of these models fails on the timestep op.
Weights can then be compressed by coremltools.optimize (int8 linear symmetric or 6-bit
k-means palettization); int8 activations are calibrated by running the model, which Core ML
can only do on macOS. Inputs and outputs carry the names of the sidecar (the automatically
named outputs become `sample` / `prediction` / `image` / `hidden_states` + `pooled`); class labels
and token ids are int32 because Core ML has no int64 inputs. Shapes are static (a fixed batch).

torch.export of a CLIP text encoder slices its position-id buffer to the sequence length; with
the static length that slice covers the whole buffer, and `run_decompositions` turns it into
`aten.alias`, which coremltools 9.0 has no conversion for ("Unsupported fx node alias"). A
functional graph's alias is its input, so `_drop_aliases` rewires its users before conversion.
SD3's T5 encoder needs `aten.where.ScalarOther`, which coremltools 9.0 lacks; it is registered here
as the mirror of the `where.ScalarSelf` it has.

Prediction needs macOS, so every package is checked structurally after it is written (the spec
loads, names, shapes and dtypes match the sidecar, the weights are stored once) on any OS.

Mobile layouts (Apple's ml-stable-diffusion): ``attention='split-einsum'`` converts with per-head
attention in the Neural Engine's (B, C, 1, S) layout (export.coreml_attention), and ``chunk_bytes``
writes the denoiser as `denoiser_chunk<k>.mlpackage` pieces of at most that many weight bytes each,
chained by the `chunks` list of denoiser.coreml.json (export.coreml_chunks). With 'palettize6' that
is the iOS layout of Apple's `--chunk-unet --attention-implementation SPLIT_EINSUM --quantize-nbits 6`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.components import Pipeline
from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.outputs import files_sha256, staged_files
from compress.solvers import SolverConfig
from export.component_graphs import pipeline_graphs
from export.coreml_attention import ATTENTIONS, attention_layout
from export.sampler_graph import DenoiserGraph, SamplerGraph
from export.sidecar import denoiser_sidecar, sampler_sidecar, write_sidecar

WEIGHTS = ("float", "int8", "palettize6")
ACTIVATIONS = ("float", "int8")
DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
SIDECAR_SUFFIX = ".coreml.json"  # <kind>.json belongs to the ONNX model in the same folder
# weight.bin may hold a little more than the float16 weights (per-step folded constants), never a copy per step.
WEIGHT_SLACK = 1.25, 256 * 1024
CALIBRATION_SAMPLES = 8
# coremltools writes this ExecuTorch debugging aid next to the model of a torch.export conversion;
# it is not part of the package (Manifest.json does not list it) and can outweigh a small model.
DEBUG_MAPPING = "executorch_debug_handle_mapping.json"
METADATA_PREFIX = "diffusion_compress."
# Sidecar sections copied into a package's metadata when its sidecar has them.
METADATA_SECTIONS = ("prediction_type", "data_range", "tokenizer", "scaling")


def import_coremltools():
    """coremltools, without its import-time warnings (no native runtime off macOS, untested torch/sklearn versions)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools

    _register_where_scalar_other()
    return coremltools


def _register_where_scalar_other() -> None:
    """T5's attention masks its scores with ``where(mask, scores, <float min>)``, which torch.export records as
    `aten.where.ScalarOther`; coremltools 9.0 converts only the mirrored `where.ScalarSelf`. Both are one
    `select` whose scalar side is a constant, so the existing translation serves for both."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    registry = _TORCH_OPS_REGISTRY.name_to_func_mapping
    if "where.scalarother" not in registry and "where.scalarself" in registry:
        _TORCH_OPS_REGISTRY.set_func_by_name(registry["where.scalarself"], "where.scalarother")


def export_coreml(
    denoiser: Denoiser,
    solver_config: SolverConfig,
    out_dir: str | Path,
    batch_size: int = 1,
    weights: str = "float",
    activations: str = "float",
    deployment_target: str | None = None,
    guidance: bool | None = None,
    attention: str = "original",
    chunk_bytes: int | None = None,
) -> list[dict]:
    """Writes sampler.mlpackage, denoiser.mlpackage and their sidecars into ``out_dir``; one record per package.

    ``weights``: 'float' (float16), 'int8' (linear symmetric, per channel) or 'palettize6' (6-bit k-means).
    ``activations``: 'int8' calibrates activation quantizers by Core ML prediction (macOS, iOS17 or later).
    ``deployment_target`` None picks iOS16, or iOS17 when activations are int8.
    ``attention``: 'original' or 'split-einsum' (per-head, (B, C, 1, S): the Neural Engine's layout).
    ``chunk_bytes``: the denoiser as chained `denoiser_chunk<k>.mlpackage`s of at most that many weight bytes each
    (one record per chunk); the sampler stays one package.
    """
    _check_options(batch_size, weights, activations, deployment_target, attention, chunk_bytes)
    settings = _settings(weights, activations, deployment_target, attention, chunk_bytes)
    out_dir = Path(out_dir)
    with on_cpu(denoiser, denoiser.device):
        sampler, network = SamplerGraph(denoiser, solver_config, guidance), DenoiserGraph(denoiser)
        extra = {"coreml": settings}
        graphs = [
            (sampler, "sampler", sampler_sidecar(sampler, "coreml", "sampler.mlpackage", batch_size, extra)),
            (network, "denoiser", denoiser_sidecar(network, "coreml", "denoiser.mlpackage", batch_size, extra)),
        ]
        return _write_packages(graphs, out_dir, settings)


def export_denoiser_coreml(
    denoiser: Denoiser,
    out_dir: str | Path,
    batch_size: int = 1,
    weights: str = "float",
    attention: str = "original",
    chunk_bytes: int | None = None,
) -> list[dict]:
    """The bare denoiser only (denoiser.mlpackage, or its chunks with ``chunk_bytes``) and denoiser.coreml.json.

    What an app that runs its own scheduler loop ships (Apple's ml-stable-diffusion layout); no sampler graph."""
    _check_options(batch_size, weights, "float", None, attention, chunk_bytes)
    settings = _settings(weights, "float", None, attention, chunk_bytes)
    with on_cpu(denoiser, denoiser.device):
        network = DenoiserGraph(denoiser)
        sidecar = denoiser_sidecar(network, "coreml", "denoiser.mlpackage", batch_size, {"coreml": settings})
        return _write_packages([(network, "denoiser", sidecar)], Path(out_dir), settings)


@contextlib.contextmanager
def on_cpu(module, device):
    """Traced and converted on the CPU; ``module`` goes back to the caller's ``device`` afterwards, also on errors."""
    module.to("cpu")
    try:
        yield module
    finally:
        module.to(device)


def _settings(weights: str, activations: str, deployment_target: str | None, attention: str, chunk_bytes: int | None) -> dict:
    target = deployment_target or ("iOS17" if activations == "int8" else "iOS16")
    return {"weights": weights, "activations": activations, "deployment_target": target, "compute_precision": "float16",
            "attention": attention, "chunk_bytes": chunk_bytes}


def export_pipeline_coreml(
    pipeline: Pipeline,
    solver_config: SolverConfig,
    out_dir: str | Path,
    batch_size: int = 1,
    weights: str = "float",
    guidance: bool | None = None,
    output: str = "image",
    attention: str = "original",
    chunk_bytes: int | None = None,
) -> list[dict]:
    """A text-to-image pipeline as Core ML packages in ``out_dir``, next to its ONNX files; one record per package.

    Writes text_encoder(_2).mlpackage (input_ids int32), sampler.mlpackage (the VAE decoder baked in
    when ``output`` is 'image'; 'latents' keeps the latent output `sample`), denoiser.mlpackage,
    vae_decoder.mlpackage and vae_encoder.mlpackage, each with its <kind>.coreml.json. Guidance is
    on iff the solver has a guidance scale (as export_pipeline_onnx), with the negative prompt's
    condition as inputs. The tokenizers and pipeline.json are the ONNX export's: add these
    packages to pipeline.json with `export.sidecar.record_component_files`. ``attention`` and ``chunk_bytes`` as in
    `export_coreml` (the attention layout applies to every diffusers Attention: the UNet's and the VAE's; chunking to
    the denoiser, whose chunks are the components denoiser_chunk1, denoiser_chunk2, ...).
    """
    _check_options(batch_size, weights, "float", None, attention, chunk_bytes)
    settings = _settings(weights, "float", None, attention, chunk_bytes)
    with on_cpu(pipeline, pipeline.denoiser.device):
        _, graphs = pipeline_graphs(pipeline, solver_config, "coreml", batch_size, guidance, output, extra={"coreml": settings})
        return _write_packages(graphs, out_dir, settings)


def check_coreml_pipeline(pipeline) -> None:
    """Refuses what static Core ML shapes cannot express: an encoder whose prompts and negative prompts differ in length (Sana)."""
    for encoder in pipeline.text_encoders:
        if encoder.prefix:
            raise UserError(f"{pipeline.class_name}'s {encoder.name} takes prompts of {encoder.prompt_length} tokens (behind its instruction) and "
                            f"negative prompts of {encoder.max_length}; Core ML packages have static shapes, so this pipeline exports to "
                            f"ONNX and OpenVINO only")


def _write_packages(graphs: list[tuple[nn.Module, str, dict]], out_dir: Path, settings: dict) -> list[dict]:
    """Converts each (graph, kind, sidecar) in a staging folder inside ``out_dir``, then renames them all into place."""
    out_dir = Path(out_dir)
    with staged_files(out_dir, ".coreml-export-") as stage:
        records = [r for graph, kind, sidecar in graphs for r in _write_graph(graph, kind, _coreml_sidecar(sidecar), stage, settings)]
    for record in records:
        for key in ("path", "sidecar"):
            record[key] = str(out_dir / record[key])
    return records


def check_coreml_options(batch_size: int = 1, weights: str = "float", attention: str = "original", chunk_bytes: int | None = None) -> None:
    """The options of `export_coreml` / `export_pipeline_coreml` that a caller passes through, checked before long work."""
    _check_options(batch_size, weights, "float", None, attention, chunk_bytes)


def _check_options(batch_size, weights: str, activations: str, deployment_target: str | None, attention: str = "original",
                   chunk_bytes: int | None = None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"Core ML export needs a fixed positive batch size, got {batch_size!r}")
    if attention not in ATTENTIONS:
        raise UserError(f"unknown Core ML attention option {attention!r} (available: {', '.join(ATTENTIONS)})")
    if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0):
        raise UserError(f"the Core ML chunk size must be a positive number of bytes, got {chunk_bytes!r}")
    for what, value, allowed in (("weights", weights, WEIGHTS), ("activations", activations, ACTIVATIONS)):
        if value not in allowed:
            raise UserError(f"unknown Core ML {what} option {value!r} (available: {', '.join(allowed)})")
    if deployment_target is not None and deployment_target not in DEPLOYMENT_TARGETS:
        raise UserError(f"unknown Core ML deployment target {deployment_target!r} (available: {', '.join(DEPLOYMENT_TARGETS)})")
    if activations == "int8":
        if deployment_target in ("iOS16",):
            raise UserError("Core ML int8 activations need deployment target iOS17 or later")
        if platform.system() != "Darwin":
            raise UserError("Core ML int8 activations are calibrated by running the model with Core ML, which needs macOS")


def _coreml_sidecar(sidecar: dict) -> dict:
    """Core ML has no int64 inputs: class labels and token ids are int32 in this format."""
    for spec in sidecar["inputs"]:
        if spec["dtype"] == "int64":
            spec["dtype"] = "int32"
            spec["note"] = "int32 in Core ML, which has no int64 inputs (the ONNX model takes int64; the values are the same)"
    return sidecar


def _write_graph(graph: nn.Module, kind: str, sidecar: dict, stage: Path, settings: dict) -> list[dict]:
    """One graph's records: one package, or one per chunk when the denoiser is chunked."""
    if kind == "denoiser" and settings.get("chunk_bytes"):
        ct = import_coremltools()
        return _write_chunks(_converted(ct, graph, sidecar, settings), graph, kind, sidecar, stage, settings)
    return [_write_package(graph, kind, sidecar, stage, settings)]


def _converted(ct, graph: nn.Module, sidecar: dict, settings: dict):
    """The graph converted (in the attention layout of ``settings``) and its weights compressed."""
    batch_size = sidecar["batch"]["size"]
    with attention_layout(graph, settings.get("attention", "original")):
        model = _convert(ct, graph, sidecar, batch_size, settings["deployment_target"])
    return _compress(ct, model, graph, batch_size, settings)


def _write_package(graph: nn.Module, kind: str, sidecar: dict, stage: Path, settings: dict) -> dict:
    ct = import_coremltools()
    batch_size = sidecar["batch"]["size"]
    model = _converted(ct, graph, sidecar, settings)
    _describe(model, kind, sidecar)
    path = stage / sidecar["file"]
    model.save(str(path))
    (path / DEBUG_MAPPING).unlink(missing_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    structure = inspect_package(path)
    check_package(structure, sidecar)
    # A text encoder has no unrolled steps to duplicate weights over, and T5's relative position bias folds into a
    # constant of heads x tokens x tokens that outweighs a tiny encoder's parameters.
    if not kind.startswith("text_encoder"):
        _check_weights_stored_once(structure["weight_file_bytes"], weight_bytes, kind)
    sidecar_path = write_sidecar(stage / f"{kind}{SIDECAR_SUFFIX}", sidecar)
    return {
        "path": path.name,
        "format": "coreml",
        "kind": kind,
        "bytes": package_bytes(path),
        "sha256": package_sha256(path),
        "sidecar": sidecar_path.name,
        "batch_size": batch_size,
        "weight_bytes": weight_bytes,
        "weight_file_bytes": structure["weight_file_bytes"],
        "ops": structure["op_count"],
        "op_types": structure["ops"],
        **{k: settings[k] for k in ("weights", "activations", "deployment_target", "compute_precision")},
        "attention": settings.get("attention", "original"),
    }


def _write_chunks(model, graph: nn.Module, kind: str, sidecar: dict, stage: Path, settings: dict) -> list[dict]:
    """The converted denoiser cut into chained chunk packages; ``kind``.coreml.json lists them under ``chunks``."""
    from export.coreml_chunks import chain_entry, check_chain, chunk_file, chunk_sidecar, split_model

    max_bytes = settings["chunk_bytes"]
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    described = {s["name"]: s.get("description", "") for s in sidecar["inputs"] + sidecar["outputs"]}
    model_inputs = {s["name"] for s in sidecar["inputs"]}
    made: dict = {}
    entries, owns, structures = [], [], []
    with _quiet():
        for k, (chunk, planned_bytes) in enumerate(split_model(model, max_bytes)):
            file = chunk_file(kind, k + 1)
            spec = chunk.get_spec()
            entry = chain_entry(k, file, _features(spec.description.input), _features(spec.description.output), model_inputs, made)
            entry["planned_weight_bytes"] = planned_bytes
            own = chunk_sidecar(sidecar, entry, kind)
            _describe_chunk(chunk, own, described)
            path = stage / file
            chunk.save(str(path))
            (path / DEBUG_MAPPING).unlink(missing_ok=True)
            del chunk
            structure = inspect_package(path)
            check_package(structure, own)
            entry["weight_bytes"] = own["weight_bytes"] = structure["weight_file_bytes"]
            entries.append(entry), owns.append(own), structures.append(structure)
    del model
    check_chain(entries, sidecar["inputs"], sidecar["outputs"])
    _check_weights_stored_once(sum(s["weight_file_bytes"] for s in structures), weight_bytes, kind)
    chained = {**sidecar, "file": None, "chunks": entries,
               "chunking": {"max_chunk_bytes": max_bytes, "count": len(entries),
                            "how": "run the chunks in this order; each input comes from the model's inputs ('from': 'input') or from the "
                                   "outputs of the chunk whose index 'from' names (crossing tensors are float32); the model's outputs "
                                   "come out of the last chunk"}}
    records = []
    for entry, own, structure in zip(entries, owns, structures):
        own["chunk"]["count"] = len(entries)
        own_path = write_sidecar(stage / f"{kind}_chunk{entry['index'] + 1}{SIDECAR_SUFFIX}", own)
        path = stage / entry["file"]
        records.append({
            "path": path.name,
            "format": "coreml",
            "kind": f"{kind}_chunk{entry['index'] + 1}",
            "chunk": {"index": entry["index"], "count": len(entries)},
            "bytes": package_bytes(path),
            "sha256": package_sha256(path),
            "sidecar": own_path.name,
            "chain_sidecar": f"{kind}{SIDECAR_SUFFIX}",
            "batch_size": sidecar["batch"]["size"],
            "weight_bytes": weight_bytes,
            "weight_file_bytes": structure["weight_file_bytes"],
            "ops": structure["op_count"],
            "op_types": structure["ops"],
            **{k: settings[k] for k in ("weights", "activations", "deployment_target", "compute_precision", "attention", "chunk_bytes")},
        })
    write_sidecar(stage / f"{kind}{SIDECAR_SUFFIX}", chained)
    return records


def _describe_chunk(chunk, own: dict, described: dict) -> None:
    """Descriptions and metadata of a chunk package, set before it is saved."""
    chunk.author, chunk.version = "diffusion-compress", "0.1.0"
    chunk.short_description = own["description"]
    for side, target in ((own["inputs"], chunk.input_description), (own["outputs"], chunk.output_description)):
        for spec in side:
            own_name = spec.get("from", "input") == "input" or spec["name"] in described
            target[spec["name"]] = (described.get(spec["name"]) if own_name else None) or f"tensor {spec['name']} of the chain in {own['chunk']['chain']}"
    metadata = {"interface": {"inputs": own["inputs"], "outputs": own["outputs"], "batch": own["batch"]}, "kind": own["kind"],
                "chunk": {k: own["chunk"][k] for k in ("index", "chain")}, "sidecar": f"{Path(own['file']).stem}{SIDECAR_SUFFIX}"}
    for key, value in metadata.items():
        chunk.user_defined_metadata[METADATA_PREFIX + key] = json.dumps(value)


def _convert(ct, graph: nn.Module, sidecar: dict, batch_size: int, deployment_target: str):
    example = tuple(x.cpu() for x in graph.example_inputs(batch_size))
    dtypes = {"float32": np.float32, "int32": np.int32}
    inputs = [ct.TensorType(name=spec["name"], shape=tuple(x.shape), dtype=dtypes[spec["dtype"]]) for spec, x in zip(sidecar["inputs"], example)]
    with torch.no_grad(), _quiet():
        program = export_program(graph, example)
        return ct.convert(
            program,
            inputs=inputs,
            # Named here, the outputs are renamed from their automatic names to the sidecar's (in the graph's order).
            outputs=[ct.TensorType(name=spec["name"], dtype=np.float32) for spec in sidecar["outputs"]],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, deployment_target),
        )


def export_program(graph: nn.Module, example: tuple[torch.Tensor, ...]):
    """The ExportedProgram that coremltools converts: torch.export, `run_decompositions`, no-op aliases dropped."""
    with torch.no_grad():
        program = torch.export.export(graph.eval(), example).run_decompositions({})
    _drop_aliases(program)
    return program


def _drop_aliases(program) -> int:
    """Replaces each `aten.alias` by its input; returns how many there were.

    A slice over a whole dimension (CLIP's `position_ids[:, :seq_length]` at the full, static
    length) decomposes to `aten.alias`, which coremltools cannot convert. The graph is functional
    (nothing is mutated in place), so an alias and its input hold the same values. Aliases that
    are graph outputs stay: the output signature names them.
    """
    graph = program.graph_module.graph
    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default and all(u.op != "output" for u in node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            dropped += 1
    if dropped:
        graph.lint()
        program.graph_module.recompile()
    return dropped


def _compress(ct, model, graph: nn.Module, batch_size: int, settings: dict):
    from coremltools.optimize import coreml as cto

    with _quiet():
        if settings["activations"] == "int8":
            from coremltools.optimize.coreml.experimental import OpActivationLinearQuantizerConfig, linear_quantize_activations

            samples = [_feeds(graph, batch_size, seed) for seed in range(CALIBRATION_SAMPLES)]
            config = cto.OptimizationConfig(global_config=OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
            model = linear_quantize_activations(model, config, samples)
        if settings["weights"] == "int8":
            config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
            model = cto.linear_quantize_weights(model, config)
        elif settings["weights"] == "palettize6":
            config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=6))
            model = cto.palettize_weights(model, config)
    return model


def _feeds(graph: nn.Module, batch_size: int, seed: int) -> dict:
    """Calibration inputs: the graph's example inputs with fresh noise (the sampler makes its own trajectory)."""
    example = [x.cpu().numpy() for x in graph.example_inputs(batch_size)]
    example[0] = np.random.default_rng(seed).standard_normal(example[0].shape).astype(np.float32)
    return {name: x.astype(np.int32) if x.dtype == np.int64 else x for name, x in zip(graph.input_names, example)}


def _describe(model, kind: str, sidecar: dict) -> None:
    """Xcode shows these descriptions; apps read the interface, solver and guidance from the metadata."""
    model.author = "diffusion-compress"
    model.version = "0.1.0"
    model.short_description = f"diffusion-compress {kind}; interface in {kind}{SIDECAR_SUFFIX}"
    for spec in sidecar["inputs"]:
        model.input_description[spec["name"]] = spec.get("description", "")
    for spec in sidecar["outputs"]:
        model.output_description[spec["name"]] = spec.get("description", "")
    metadata = {
        "interface": {"inputs": sidecar["inputs"], "outputs": sidecar["outputs"], "batch": sidecar["batch"]},
        "kind": kind,
        **{key: sidecar[key] for key in METADATA_SECTIONS if key in sidecar},
        "sidecar": f"{kind}{SIDECAR_SUFFIX}",
    }
    if kind == "sampler":
        solver = sidecar["solver"]
        metadata.update(solver={k: solver[k] for k in ("name", "steps", "spacing", "options", "nfe")},
                        timesteps=solver["timesteps"], guidance=sidecar["guidance"])
    for key, value in metadata.items():
        model.user_defined_metadata[METADATA_PREFIX + key] = json.dumps(value)


@contextlib.contextmanager
def _quiet():
    """coremltools draws progress bars and warns about untested versions on stderr; the CLI prints its own lines."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- structural checks (any OS)


def inspect_package(path: str | Path) -> dict:
    """What a package holds, read from its spec without Core ML: interface, op counts, weight file size, metadata."""
    ct = import_coremltools()
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise UserError(f"{path} is not a Core ML package (no Manifest.json)")
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:  # a truncated or foreign protobuf
        raise UserError(f"{path} is not a readable Core ML package: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    ops: Counter = Counter()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                _count_ops(block, ops)
    weight_files = list(path.glob("Data/com.apple.CoreML/weights/*"))
    return {
        "spec_version": spec.specificationVersion,
        "model_type": spec.WhichOneof("Type"),
        "inputs": _features(spec.description.input),
        "outputs": _features(spec.description.output),
        "ops": dict(ops.most_common()),
        "op_count": sum(ops.values()),
        "weight_file_bytes": sum(f.stat().st_size for f in weight_files),
        "metadata": dict(spec.description.metadata.userDefined),
    }


def _features(features) -> list[dict]:
    """Name, shape and dtype of each input or output of a spec (a multiarray's dtype as 'float32', 'int32', ...)."""
    from coremltools.proto import FeatureTypes_pb2

    array_type = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    found = []
    for f in features:
        kind = f.type.WhichOneof("Type")
        if kind != "multiArrayType":
            found.append({"name": f.name, "type": kind})
        else:
            found.append({"name": f.name, "shape": list(f.type.multiArrayType.shape), "dtype": array_type.Name(f.type.multiArrayType.dataType).lower()})
    return found


def _count_ops(block, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def check_package(structure: dict, sidecar: dict) -> None:
    """The package's inputs and outputs are the sidecar's, by name, shape and dtype, and it is an ML program."""
    if structure["model_type"] != "mlProgram":
        raise RuntimeError(f"{sidecar['file']} is a {structure['model_type']}, not an ML program")
    for side in ("inputs", "outputs"):
        found = [(f["name"], f.get("shape"), f.get("dtype")) for f in structure[side]]
        expected = [(s["name"], s["shape"], s["dtype"]) for s in sidecar[side]]
        if found != expected:
            raise RuntimeError(f"{sidecar['file']} has {side} {found}; the sidecar says {expected}")


def _check_weights_stored_once(weight_file_bytes: int, weight_bytes: int, kind: str) -> None:
    factor, slack = WEIGHT_SLACK
    float16_bytes = weight_bytes // 2
    if weight_file_bytes > factor * float16_bytes + slack:
        raise RuntimeError(
            f"{kind}.mlpackage stores {weight_file_bytes / 1e6:.2f} MB of weights for {float16_bytes / 1e6:.2f} MB of float16 "
            "parameters: the weights are not shared across the unrolled steps"
        )


def package_files(path: Path) -> list[Path]:
    return sorted((p for p in Path(path).rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in package_files(path))


def package_sha256(path: Path) -> str:
    """One digest for a package folder: each file's relative path and bytes, files in sorted order."""
    return files_sha256((file.relative_to(path).as_posix(), file) for file in package_files(path))
