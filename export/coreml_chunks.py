"""Core ML denoiser chunks: one converted ML program cut into packages of at most ``max_chunk_bytes`` of weights each.

iOS and iPadOS refuse (or page badly) a single model file of more than about 1 GB; Apple's
ml-stable-diffusion therefore ships the SD UNet as two `.mlpackage`s (its `--chunk-unet`, which now
calls coremltools' `bisect_model`). That tool always makes two halves. Here the program is cut into
as many pieces as the weights need, so the same code serves a 1.7 GB float16 UNet (two chunks under
1 GB) and an SDXL one (more).

How a cut is made (facts read from ml-stable-diffusion's chunk_mlprogram.py and coremltools'
`bisect_model`, code written here):
- The main function's operations are in topological order. Weights are the values of `const` ops and
  of the compressed-weight `constexpr_*` ops (a palettized weight is its look-up table plus packed
  indices), so the cumulative weight bytes along that order say where each chunk ends.
- A chunk ends after a compute op (not a weight) whose single output feeds one op, near where the
  cumulative weight reaches the chunk's share; the shares are equal (total / N), N the fewest chunks
  that keep each at most ``max_chunk_bytes``. Apple cuts at the first such op past half the weights;
  here, within 5% of a share either side, the cut goes where the fewest activation bytes cross it.
- Every non-constant tensor made before a cut and read after it crosses the cut: it becomes an output
  of the chunk that makes it and an input of every later chunk that reads it (a UNet's skip
  connections cross several cuts). Crossing tensors are float32 in the interface (cast from and back
  to float16 inside the chunks, as Apple does); their names are the program's tensor names.
- A weight read on both sides of a cut is kept in each chunk that reads it (dead-code elimination
  keeps what a chunk's outputs need); the measured bytes of each written chunk are what is reported
  and checked.

The chain is recorded in the denoiser's sidecar as ``chunks``: per chunk its file, inputs (name,
shape, dtype and ``from``: "input" for the model's own inputs or the index of the chunk that makes
it), outputs and weight bytes, in the order an app runs them. `check_chain` verifies it from the
written packages' specs alone (any OS); running the chunks needs Core ML, so macOS.
"""
from __future__ import annotations

import gc
import math
from collections import OrderedDict

import numpy as np

from compress.errors import UserError

DEFAULT_MAX_CHUNK_BYTES = 1_000_000_000  # "about 1 GB", the size Apple's chunking keeps each UNet piece under
CHUNK_FILE = "{kind}_chunk{index}.mlpackage"
MAX_CHUNKS = 64
CUT_WINDOW = 0.05  # a cut may fall this fraction of a chunk's share of the weights early or late, where less crosses it


def chunk_file(kind: str, index: int) -> str:
    """File name of chunk ``index`` (1-based, the order they run in)."""
    return CHUNK_FILE.format(kind=kind, index=index)


def op_weight_bytes(op) -> int:
    """Bytes of weights an op holds: a const's array. A compressed weight (`constexpr_*`) reads its look-up table and
    packed indices from const ops of their own, so those are counted there."""
    if op.op_type == "const":
        value = op.outputs[0].val
        return int(value.nbytes) if isinstance(value, np.ndarray) else 0
    return 0


def _is_weight(op) -> bool:
    return op.op_type.startswith("const")


def load_program(model):
    """The MIL program of a converted MLModel, weights included (read from its weights folder)."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, model.weights_dir)
    if len(program.functions) != 1 or "main" not in program.functions:
        raise UserError("Core ML chunking needs a program with one 'main' function")
    block = program.functions["main"]
    block.operations = list(block.operations)
    return program, spec.specificationVersion


def plan_cuts(block, max_chunk_bytes: int) -> tuple[list[int], list[int]]:
    """Cut positions (index of the first op of each chunk after the first) and each chunk's planned weight bytes.

    The fewest chunks whose equal shares fit ``max_chunk_bytes``; more if the allowed cut points make a share overflow.
    Near each share's end (within CUT_WINDOW of a share) the cut falls where the fewest activation bytes cross it.
    """
    ops = block.operations
    sizes = [op_weight_bytes(op) for op in ops]
    total = sum(sizes)
    largest = max(sizes, default=0)
    if largest > max_chunk_bytes:
        raise UserError(f"one weight of the model holds {largest / 1e6:.1f} MB, more than the Core ML chunk size "
                        f"{max_chunk_bytes / 1e6:.1f} MB: choose a larger chunk size")
    cumulative = np.cumsum(sizes)
    index = {id(op): i for i, op in enumerate(ops)}
    eligible = [i for i, op in enumerate(ops) if not _is_weight(op) and len(op.outputs) == 1 and len(op.outputs[0].child_ops) == 1
                and all(index[id(c)] > i for c in op.outputs[0].child_ops)]
    crossing = crossing_bytes(block)
    for count in range(max(1, math.ceil(total / max_chunk_bytes)), MAX_CHUNKS + 1):
        cuts, start, share = [], 0, total / count
        for k in range(1, count):
            target = share * k
            window = [i for i in eligible if i >= start and abs(cumulative[i] - target) <= CUT_WINDOW * share]
            if window:  # the cut after op i: what crosses it is what is alive between op i and op i + 1
                after = min(window, key=lambda i: (crossing[i + 1], abs(cumulative[i] - target)))
            else:  # the first allowed op at which the cumulative weight reaches this chunk's share
                after = next((i for i in eligible if i >= start and cumulative[i] >= target), None)
            if after is None:
                break
            cuts.append(after + 1)
            start = after + 1
        bounds = [0, *cuts, len(ops)]
        planned = [int(sum(sizes[a:b])) for a, b in zip(bounds, bounds[1:])]
        if max(planned) <= max_chunk_bytes:
            return cuts, planned
    raise UserError(f"the Core ML program ({total / 1e6:.1f} MB of weights) cannot be cut into at most {MAX_CHUNKS} chunks of "
                    f"{max_chunk_bytes / 1e6:.1f} MB: choose a larger chunk size")


def crossing_bytes(block) -> np.ndarray:
    """For each cut position c (before op c), the bytes of the tensors made before it and read at or after it,
    as float32 (their dtype in a chunk's interface); weights and replicated casts do not cross."""
    ops = block.operations
    index = {id(op): i for i, op in enumerate(ops)}
    function_inputs = {id(v) for v in block.inputs.values()}
    change = np.zeros(len(ops) + 2, dtype=np.int64)
    for i, op in enumerate(ops):
        if _is_weight(op) or _replicable(op, function_inputs):
            continue
        for var in op.outputs:
            readers = [index[id(c)] for c in var.child_ops]
            if var.val is not None or not readers or not all(isinstance(d, int) for d in var.shape):
                continue
            nbytes = int(np.prod(var.shape, dtype=np.int64)) * 4
            change[i + 1] += nbytes  # crosses every cut from just after op i up to its last reader
            change[max(readers) + 1] -= nbytes
    return np.cumsum(change)[: len(ops) + 1]


def _replicable(op, function_inputs: set[int]) -> bool:
    """A cast of a model input (encoder_hidden_states to float16): each chunk that reads it repeats it, rather than
    receiving a float32 copy of a tensor it already has."""
    return op.op_type == "cast" and all(id(v) in function_inputs or v.val is not None for v in op.inputs.values())


def _crossing(ops, start: int, end: int, outputs, function_inputs: set[int]) -> tuple[list, list]:
    """Vars made before ``start`` and read in [start, ...), and vars made in [start, end) and read at or after ``end`` (or model outputs)."""
    index = {id(op): i for i, op in enumerate(ops)}
    final = {id(v) for v in outputs}
    into, out_of = [], []
    for i, op in enumerate(ops[:end]):
        if _is_weight(op) or (_replicable(op, function_inputs) and not any(id(v) in final for v in op.outputs)):
            continue
        for var in op.outputs:
            if var.val is not None:  # a folded constant: its op comes along where it is read
                continue
            readers = [index[id(c)] for c in var.child_ops]
            if i < start and any(r >= start for r in readers):
                into.append(var)
            elif i >= start and (id(var) in final or any(r >= end for r in readers)):
                out_of.append(var)
    return into, out_of


def chunk_program(model, cuts: list[int], k: int):
    """Program of chunk ``k`` (0-based): the ops between its cuts, with crossing tensors as float32 inputs and outputs."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import Placeholder, types
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    program, spec_version = load_program(model)
    block = program.functions["main"]
    ops = block.operations
    bounds = [0, *cuts, len(ops)]
    start, end = bounds[k], bounds[k + 1]
    final_outputs = list(block.outputs)
    into, out_of = _crossing(ops, start, end, final_outputs, {id(v) for v in block.inputs.values()})
    final = {id(v) for v in final_outputs}
    with block:
        new_outputs = []
        for var in out_of:
            if id(var) in final or var.dtype != types.fp16:
                new_outputs.append(var)
                continue
            name = var.name
            var.set_name(f"{name}__half")
            new_outputs.append(mb.cast(x=var, dtype="fp32", name=name))
        if start > 0:
            anchor = ops[start - 1]
            for var in into:
                name = var.name
                var.set_name(f"{name}__made_earlier")
                placeholder = Placeholder(sym_shape=var.shape, dtype=types.fp32 if var.dtype == types.fp16 else var.dtype, name=name)
                block._input_dict[name] = placeholder.outputs[0]
                block.function_inputs = tuple(block._input_dict.values())
                new_var = placeholder.outputs[0]
                if var.dtype == types.fp16:
                    new_var = mb.cast(x=new_var, dtype="fp16", name=f"{name}__to_half", before_op=var.op)
                # force: compressed-weight (constexpr) readers would otherwise block the replacement
                block.replace_uses_of_var_after_op(anchor_op=anchor, old_var=var, new_var=new_var, force_replace=True)
        block.outputs.clear()
        block.set_outputs(new_outputs)
    PASS_REGISTRY["common::dead_code_elimination"](program)
    block._input_dict = OrderedDict((name, v) for name, v in block._input_dict.items() if v.child_ops)
    block.function_inputs = tuple(block._input_dict.values())
    return program, spec_version


def split_model(model, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
    """Yields (chunk MLModel, planned weight bytes) for each chunk of a converted (and possibly compressed) MLModel, in run order.

    One chunk at a time is built from a fresh load of the program, so the peak holds one copy of the weights
    in memory beside the chunk being written."""
    from coremltools import ComputeUnit
    from coremltools.converters.mil.converter import mil_convert

    if not isinstance(max_chunk_bytes, int) or isinstance(max_chunk_bytes, bool) or max_chunk_bytes <= 0:
        raise UserError(f"the Core ML chunk size must be a positive number of bytes, got {max_chunk_bytes!r}")
    program, _ = load_program(model)
    cuts, planned = plan_cuts(program.functions["main"], max_chunk_bytes)
    del program
    gc.collect()
    for k in range(len(cuts) + 1):
        program, spec_version = chunk_program(model, cuts, k)
        chunk = mil_convert(program, convert_from="milinternal", convert_to="mlprogram", specification_version=spec_version,
                            compute_units=ComputeUnit.CPU_ONLY, skip_model_load=True)
        del program
        gc.collect()
        yield chunk, planned[k]


# ----------------------------------------------------------------------------- the chain (structural, any OS)


def chain_entry(k: int, file: str, inputs: list[dict], outputs: list[dict], model_inputs: set[str], made: dict) -> dict:
    """Chunk ``k``'s entry of the sidecar's ``chunks`` list from its spec's features; ``made`` (name -> chunk index) grows."""
    entry = {
        "index": k,
        "file": file,
        "inputs": [{"name": f["name"], "shape": f.get("shape"), "dtype": f.get("dtype"),
                    "from": "input" if f["name"] in model_inputs else made.get(f["name"])} for f in inputs],
        "outputs": [{"name": f["name"], "shape": f.get("shape"), "dtype": f.get("dtype")} for f in outputs],
    }
    made.update((f["name"], k) for f in outputs)
    return entry


def check_chain(chunks: list[dict], model_inputs: list[dict], model_outputs: list[dict], max_chunk_bytes: int | None = None) -> None:
    """Raises unless the chunks chain: each input is a model input or an earlier chunk's output of equal shape and dtype,
    the model's outputs come out of the chunks with the sidecar's shapes, and each chunk's weights fit the chunk size."""
    available = {(s["name"]): ("input", s["shape"], s["dtype"]) for s in model_inputs}
    for k, chunk in enumerate(chunks):
        for spec in chunk["inputs"]:
            if spec["name"] not in available:
                raise RuntimeError(f"chunk {k} ({chunk['file']}) reads {spec['name']!r}, which neither the model's inputs nor an earlier chunk make")
            source, shape, dtype = available[spec["name"]]
            if (list(shape), dtype) != (list(spec["shape"]), spec["dtype"]) or spec.get("from", source) != source:
                raise RuntimeError(f"chunk {k} ({chunk['file']}) reads {spec['name']!r} as {spec['shape']} {spec['dtype']} from {spec.get('from')!r}; "
                                   f"it is made as {shape} {dtype} by {source!r}")
        for spec in chunk["outputs"]:
            available[spec["name"]] = (k, spec["shape"], spec["dtype"])
        if max_chunk_bytes is not None and chunk["weight_bytes"] > max_chunk_bytes:
            raise RuntimeError(f"chunk {k} ({chunk['file']}) holds {chunk['weight_bytes']} bytes of weights, more than the chunk size {max_chunk_bytes}")
    for spec in model_outputs:
        made = available.get(spec["name"])
        if made is None or made[0] == "input" or (list(made[1]), made[2]) != (list(spec["shape"]), spec["dtype"]):
            raise RuntimeError(f"the chunks do not make the model output {spec['name']!r} {spec['shape']} {spec['dtype']} (found {made})")


def chunk_sidecar(whole: dict, entry: dict, kind: str) -> dict:
    """The sidecar of one chunk package: its own interface, and where it sits in the chain."""
    return {
        "schema": whole.get("schema"),
        "kind": f"{kind}_chunk",
        "format": "coreml",
        "file": entry["file"],
        "chunk": {"index": entry["index"], "count": None, "chain": f"{kind}.coreml.json"},
        "inputs": [dict(spec) for spec in entry["inputs"]],
        "outputs": [dict(spec) for spec in entry["outputs"]],
        "batch": whole["batch"],
        "weight_bytes": None,
        "description": f"chunk {entry['index'] + 1} of the {kind}; run the chunks in the order of {kind}.coreml.json's 'chunks', "
                       f"feeding each input from the model's inputs or the named earlier chunk's output",
        "coreml": whole.get("coreml"),
    }

