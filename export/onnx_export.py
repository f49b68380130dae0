"""ONNX writer: `sampler.onnx` (the whole few-step sampler) and `denoiser.onnx` (the bare network).

Each graph is traced (torch.onnx.export with dynamo=False), simplified with onnxslim (NNCF's
ONNX backend fails on graphs whose output comes from a no-op Cast), given short names, checked
with onnx.checker and written next to its JSON sidecar. Everything is written into a staging
folder inside ``out_dir`` and renamed into place at the end, so a failure leaves no half file.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import onnx
import torch
from torch import nn

from compress.components import Pipeline
from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.outputs import sha256_of, staged_files
from compress.solvers import SolverConfig
from export.component_graphs import pipeline_graphs, write_tokenizer_json
from export.onnx_graph import constants_to_initializers, drop_default_attributes, drop_identities, share_identical_constants, short_node_name, tensor_bytes
from export.onnx_weights import EXTERNAL_DATA_BYTES, WEIGHTS_FILE, WeightStore
from export.sampler_graph import DenoiserGraph, SamplerGraph
from export.sidecar import (
    BATCH,
    TOKENS,
    PIPELINE_FILE,
    denoiser_sidecar,
    pipeline_sidecar,
    record_component_files,
    sampler_sidecar,
    target_section,
    write_sidecar,
)

# Opsets the TorchScript exporter writes (attention needs 14); GroupNormalization changes meaning at 21.
OPSETS = range(14, 21)
# Constants allowed beyond the weights: per-step folded time embeddings, shapes, coefficients.
CONSTANT_SLACK = 1.25, 256 * 1024


def export_onnx(
    denoiser: Denoiser,
    solver_config: SolverConfig,
    out_dir: str | Path,
    batch_size: int | None = None,
    opset: int = 18,
    guidance: bool | None = None,
    target: str = "generic",
) -> list[dict]:
    """Writes sampler.onnx, denoiser.onnx and their sidecars into ``out_dir``; returns one record per artifact.

    ``batch_size`` None exports a dynamic batch dimension (a static ``target`` fixes it: 1); an int fixes it (everything folds).
    ``guidance`` None means: classifier-free guidance whenever the model is conditional.
    ``target`` (`export.targets`) is recorded in the sidecars, for `compress quantize` to emit its QDQ layout.
    """
    batch_size = _target_batch(target, batch_size)
    _check_options(batch_size, opset)
    sampler = SamplerGraph(denoiser, solver_config, guidance)
    network = DenoiserGraph(denoiser)
    out_dir = Path(out_dir)
    extra = {"target": target_section(target)}
    graphs = [(sampler, "sampler", sampler_sidecar(sampler, "onnx", "sampler.onnx", batch_size, extra)),
              (network, "denoiser", denoiser_sidecar(network, "onnx", "denoiser.onnx", batch_size, extra))]
    with staged_files(out_dir, ".onnx-export-") as stage, _weight_store(graphs, stage) as store:
        records = [_write_artifact(graph, kind, sidecar, stage, batch_size, opset, store) for graph, kind, sidecar in graphs]
    return _placed(records, out_dir)


def export_pipeline_onnx(
    pipeline: Pipeline,
    solver_config: SolverConfig,
    out_dir: str | Path,
    batch_size: int | None = None,
    opset: int = 18,
    guidance: bool | None = None,
    output: str = "image",
    target: str = "generic",
) -> list[dict]:
    """A text-to-image pipeline as one folder: text encoder(s), the sampler with the VAE decoder baked
    in (``output`` 'image'; 'latents' keeps the latent output), the denoiser, vae_decoder,
    vae_encoder, the tokenizers as tokenizer.json and pipeline.json, which says how they chain.
    ``target`` is recorded in every sidecar and in pipeline.json (as in `export_onnx`).
    """
    batch_size = _target_batch(target, batch_size)
    _check_options(batch_size, opset)
    extra = {"target": target_section(target)}
    sampler, graphs = pipeline_graphs(pipeline, solver_config, "onnx", batch_size, guidance, output, extra=extra)
    out_dir = Path(out_dir)
    with staged_files(out_dir, ".onnx-export-") as stage:
        with _weight_store(graphs, stage) as store:
            records = [_write_artifact(graph, kind, sidecar, stage, batch_size, opset, store) for graph, kind, sidecar in graphs]
        for encoder in pipeline.text_encoders:
            write_tokenizer_json(encoder, stage / encoder.tokenizer_name)
        write_sidecar(stage / PIPELINE_FILE, {**pipeline_sidecar(pipeline, sampler, batch_size), **extra})
        record_component_files(stage / PIPELINE_FILE, records)
    return _placed(records, out_dir)


def _target_batch(target: str, batch_size: int | None) -> int | None:
    from export.targets import get_target

    return get_target(target).batch_size(batch_size)  # NPU targets compile one static graph


def _rms_norm(g, x, normalized_shape, weight, eps):
    """aten::rms_norm as ONNX ops: x * rsqrt(mean(x^2 over the normalized dims) + eps) (* weight), as torch computes it."""
    from torch.onnx import symbolic_helper as helper

    axes = list(range(-len(helper._get_const(normalized_shape, "is", "normalized_shape")), 0))
    epsilon = torch.finfo(torch.float32).eps if helper._is_none(eps) else helper._get_const(eps, "f", "eps")
    square = g.op("Mul", x, x)
    if g.opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    scale = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32)))))
    out = g.op("Mul", x, scale)
    return out if helper._is_none(weight) else g.op("Mul", out, weight)


def _unflatten(g, x, dim, sizes):
    """aten::unflatten with the split dimension as a constant: the exporter's own computes it in the graph (Add, Mod),
    so the output's shape is not inferred and it falls back to the traced one, batch included (FLUX's attention heads,
    whose rotary embedding then reshapes to the traced batch)."""
    from torch.onnx import symbolic_helper as helper

    rank = helper._get_tensor_rank(x)
    if rank is None:
        from torch.onnx._internal.torchscript_exporter.symbolic_opset13 import unflatten

        return unflatten(g, x, dim, sizes)
    dim = helper._get_const(dim, "i", "dim") % rank
    shape = g.op("Shape", x)

    def part(start: int, end: int):
        return g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([start])), g.op("Constant", value_t=torch.tensor([end])))

    parts = ([part(0, dim)] if dim > 0 else []) + [sizes] + ([part(dim + 1, rank)] if dim + 1 < rank else [])
    return helper._reshape_helper(g, x, g.op("Concat", *parts, axis_i=0))


def _movedim(g, x, source, destination):
    """aten::movedim with negative dims wrapped first, as ATen does: the exporter's own puts a negative source dim into
    Transpose's perm as it is (AutoencoderDC's ``movedim(-1, 1)`` around its RMSNorms), which no runtime loads."""
    from torch.onnx import symbolic_helper as helper

    rank = helper._get_tensor_rank(x)

    def wrapped(dims):
        value = helper._maybe_get_const(dims, "t")  # an int or a list of ints: a 0-d or 1-d tensor
        return None if rank is None or helper._is_value(value) else [int(d) % rank for d in torch.as_tensor(value).view(-1).tolist()]

    sources, targets = wrapped(source), wrapped(destination)
    if sources is None or targets is None or len(sources) != len(targets):
        from torch.onnx._internal.torchscript_exporter.symbolic_opset9 import movedim

        return movedim(g, x, source, destination)
    perm = [None] * rank
    for s, d in zip(sources, targets):
        perm[d] = s
    rest = iter(d for d in range(rank) if d not in sources)
    perm = [p if p is not None else next(rest) for p in perm]
    return g.op("Transpose", x, perm_i=perm)


# torch.nn.RMSNorm (FLUX's query/key norms) has no symbolic in the TorchScript exporter below opset 23.
torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, OPSETS.start)
torch.onnx.register_custom_op_symbolic("aten::unflatten", _unflatten, OPSETS.start)
torch.onnx.register_custom_op_symbolic("aten::movedim", _movedim, OPSETS.start)


def _check_options(batch_size: int | None, opset: int) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"export batch_size must be a positive integer or null (dynamic), got {batch_size!r}")
    if opset not in OPSETS:
        raise UserError(f"ONNX opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} (18 is the default)")


def _placed(records: list[dict], out_dir: Path) -> list[dict]:
    for record in records:
        for key in ("path", "sidecar", "external_data"):
            if record.get(key):
                record[key] = str(out_dir / record[key])
    return records


def _weight_store(graphs: list, stage: Path):
    """The shared weights file when a graph is large (EXTERNAL_DATA_BYTES), else nothing: small exports stay one file per graph."""
    largest = max(_weight_bytes(graph) for graph, _, _ in graphs)
    return WeightStore(stage) if largest >= EXTERNAL_DATA_BYTES else nullcontext()


def _weight_bytes(graph: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in graph.parameters())


def _write_artifact(graph: nn.Module, kind: str, sidecar: dict, stage: Path, batch_size: int | None, opset: int,
                    store: WeightStore | None = None) -> dict:
    path = stage / sidecar["file"]
    with tempfile.TemporaryDirectory(dir=stage, prefix=f".{kind}-trace-") as trace_dir:
        # A traced graph over 2 GiB comes with one file per tensor in trace_dir; its weights are read from there one at a time.
        model = _trace(graph, graph.output_names, Path(trace_dir) / f"{kind}.onnx", batch_size, opset)
        if store is None:
            model = _simplify(model)
        else:  # onnxslim reads every weight into one protobuf, which a large model cannot be: the passes NNCF needs instead
            drop_identities(model)
            constants_to_initializers(model)
        share_identical_constants(model, trace_dir)
        drop_default_attributes(model)
        _check_interface(model, graph.input_names, graph.output_names, kind)
        _shorten_names(model)
        weight_bytes = _weight_bytes(graph)
        constant_bytes = sum(tensor_bytes(t) for t in model.graph.initializer)
        if kind == "sampler":
            _check_weights_stored_once(constant_bytes, weight_bytes)
        model.producer_name, model.producer_version = "diffusion-compress", "0.1.0"
        model.doc_string = f"diffusion-compress {kind}; interface in {Path(sidecar['file']).with_suffix('.json').name}"
        onnx.helper.set_model_props(model, {"diffusion_compress.sidecar": json.dumps(sidecar)})
        referenced = store.move_weights(model, Path(trace_dir)) if store is not None else 0
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))  # by path: works for models with external data too
    sidecar_path = write_sidecar(path.with_suffix(".json"), sidecar)
    return {
        "path": path.name,
        "format": "onnx",
        "kind": kind,
        "bytes": path.stat().st_size + referenced,  # the graph and the weights it reads (shared ones counted in each graph)
        "sha256": sha256_of(path),
        "sidecar": sidecar_path.name,
        "external_data": WEIGHTS_FILE if store is not None else None,
        "weight_bytes": weight_bytes,
        "constant_bytes": constant_bytes,
        "nodes": len(model.graph.node),
        "opset": opset,
        "batch_size": batch_size,
    }


def _trace(graph: nn.Module, outputs: list[str], raw_path: Path, batch_size: int | None, opset: int) -> onnx.ModelProto:
    device = next(graph.parameters()).device
    inputs = tuple(x.to(device) for x in graph.example_inputs(batch_size or 2))
    dynamic_axes = {}
    if batch_size is None:
        batched = [name for name in graph.input_names if name != "guidance_scale"]
        dynamic_axes = {name: {0: BATCH} for name in batched + outputs}
    for name in getattr(graph, "sequence_inputs", ()):  # Sana's prompts and negative prompts differ in token count
        dynamic_axes.setdefault(name, {})[1] = TOKENS
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about every python value it freezes; those are the constants we want.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, inputs, str(raw_path), input_names=graph.input_names, output_names=outputs,
            dynamic_axes=dynamic_axes or None, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    return onnx.load(str(raw_path), load_external_data=False)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    simplified = onnxslim.slim(model)
    # Shapes recorded by the simplifier are redundant (every runtime infers them) and cost bytes per node.
    del simplified.graph.value_info[:]
    return simplified


def _check_interface(model: onnx.ModelProto, inputs: list[str], outputs: list[str], kind: str) -> None:
    found_inputs = [i.name for i in model.graph.input]
    found_outputs = [o.name for o in model.graph.output]
    if found_inputs != inputs or found_outputs != outputs:
        raise RuntimeError(f"{kind}.onnx has inputs {found_inputs} and outputs {found_outputs}; expected {inputs} -> {outputs}")


def _check_weights_stored_once(constant_bytes: int, weight_bytes: int) -> None:
    factor, slack = CONSTANT_SLACK
    if constant_bytes > factor * weight_bytes + slack:
        raise RuntimeError(
            f"sampler.onnx holds {constant_bytes / 1e6:.2f} MB of constants for {weight_bytes / 1e6:.2f} MB of weights: "
            "the weights are not shared across the unrolled steps"
        )


def _shorten_names(model: onnx.ModelProto) -> None:
    """Short node, tensor and constant names: in a small model thousands of long names outweigh the weights."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # subgraphs may refer to outer names; leave such graphs as they are
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}
    for i, tensor in enumerate(graph.initializer):
        # Parameters keep the module's own state_dict names; folded constants get a number.
        new = tensor.name.removeprefix("network.") if tensor.name.startswith("network.") else f"c{i}"
        renamed[tensor.name] = new
        tensor.name = new
    used_names: set[str] = set()
    for i, node in enumerate(graph.node):
        for j, out in enumerate(node.output):
            if out and out not in keep:
                renamed[out] = f"t{i}" if j == 0 else f"t{i}_{j}"
                node.output[j] = renamed[out]
        name = short_node_name(node.name) if node.name else f"{node.op_type}_{i}"
        if name in used_names:
            name = f"{name}_{i}"
        used_names.add(name)
        node.name = name
    for node in graph.node:
        for j, inp in enumerate(node.input):
            if inp in renamed:
                node.input[j] = renamed[inp]
