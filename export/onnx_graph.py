"""ONNX graph passes and the node-naming contract shared by the exporter and the quantizer.

**Names.** The exporter names every node of an unrolled sampler ``s<step>/<module path>/<Op>``
(`short_node_name`): ``s3/unet/down_blocks.0/resnets.0/conv1/Conv``. The network's own top-level
ops (a ``torch.cat`` in its forward) sit under ``net/``; the solver's arithmetic around the
network has no module path (``s3/Mul``, or a bare ``Mul`` outside the steps); a VAE decoder baked
in after the steps is under ``decoder/``. Quantization reads these names back (`module_path`,
`layer_of`, `step_unit`, `inside_network`) to decide and to report per layer and per step, so both
sides of the contract live here.

**Passes.** Indexes of a graph (`producers`, `consumers`, `input_uses`), a stable topological sort, dead-node,
Identity and unused-initializer removal, Constant nodes as initializers, the sharing of identical constants, and the removal of attributes
that only restate the operator's default.
"""
from __future__ import annotations

import hashlib
import heapq
import re
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# ----------------------------------------------------------------------------- names

TORCH_STEP_SCOPE = re.compile(r"^/?steps\.(\d+)/")  # the scope torch.onnx gives the sampler's `steps` ModuleList
STEP_PREFIX = re.compile(r"^s(\d+)/")
# The VAE decoder a text-to-image sampler runs once after its steps: outside every step, so never
# confused with a network's own module called "decoder" (s3/decoder/...).
DECODER_SCOPE = "decoder/"


def short_node_name(torch_name: str) -> str:
    """'/steps.3/network/unet/conv_in/Conv' -> 's3/unet/conv_in/Conv': the step and the module path, nothing else."""
    name = TORCH_STEP_SCOPE.sub(r"s\1/", torch_name)
    # The network's own top-level ops keep a scope, 'net/', to tell them from the solver's arithmetic.
    name = re.sub(r"(^|/)network/(?=[A-Z])", r"\1net/", name, count=1)
    return name.replace("network/", "", 1).lstrip("/")


def module_path(node_name: str) -> str:
    """'s3/unet/down_blocks.0/resnets.0/conv1/Conv' -> 'unet/down_blocks.0/resnets.0/conv1/Conv'."""
    return STEP_PREFIX.sub("", node_name)


def inside_network(node_name: str) -> bool:
    """Nodes of the solver's own arithmetic carry no module path (``s0/Mul``): they are not the network."""
    return "/" in module_path(node_name)


def layer_of(node_name: str) -> str:
    """The module a node belongs to: its path up to the first op-named segment (ops are capitalised)."""
    parts = module_path(node_name).split("/")
    for k, part in enumerate(parts):
        if part[:1].isupper():
            return "/".join(parts[:k]) or parts[0]
    return "/".join(parts)


def step_unit(node_name: str) -> str | None:
    """'s3/enc1/conv1/Conv' -> 'step:3': the unrolled step a node of the sampler belongs to."""
    m = STEP_PREFIX.match(node_name)
    return f"step:{m.group(1)}" if m else None


def network_instance(node_name: str) -> tuple:
    """(step, scope): the unrolled copy of the denoiser (or of the VAE decoder) a node belongs to."""
    m = STEP_PREFIX.match(node_name)
    return (m.group(1) if m else None, node_name.startswith(DECODER_SCOPE))


# ----------------------------------------------------------------------------- indexes


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """{tensor: the node that computes it}."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """{tensor: the nodes that read it}, in graph order."""
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def input_uses(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """{tensor: [(node, input index)]} for every read of it."""
    out: dict[str, list] = {}
    for n in graph.node:
        for j, i in enumerate(n.input):
            out.setdefault(i, []).append((n, j))
    return out


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """From the shape: the data need not be loaded."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def tensor_data(tensor: onnx.TensorProto, base_dir: Path | None = None) -> bytes:
    """The tensor's bytes as `raw_data` stores them, read from its external file (relative to ``base_dir``) when it has one."""
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(Path(base_dir or ".") / info.location, "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


# ----------------------------------------------------------------------------- passes


def topological(nodes: list, available: set) -> list:
    """The nodes in an order where each comes after the producers of its inputs (stable otherwise)."""
    available = set(available) | {""}
    waiting: dict[str, list] = {}
    ready, order = [], []
    missing = {}
    for k, n in enumerate(nodes):
        need = {i for i in n.input if i not in available}
        missing[k] = need
        for i in need:
            waiting.setdefault(i, []).append(k)
        if not need:
            ready.append(k)
    heapq.heapify(ready)
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for out in nodes[k].output:
            for j in waiting.pop(out, []):
                missing[j].discard(out)
                if not missing[j]:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise RuntimeError("the graph has a cycle or a dangling input")
    return order


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Removes nodes whose outputs nobody reads, then initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    drop_unused_initializers(model)


def drop_identities(model: onnx.ModelProto) -> int:
    """Reads each Identity's input where its output was read; returns how many were removed.

    The tracer deduplicates a constant folded once per unrolled step by routing the copies through
    Identity nodes, and NNCF looks for a layer's weight among the initializers, not behind them.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs}
    if not source:
        return 0

    def resolve(name: str) -> str:
        while name in source:
            name = source[name]
        return name

    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in source)]
    for node in keep:
        for j, name in enumerate(node.input):
            node.input[j] = resolve(name)
    del graph.node[:]
    graph.node.extend(keep)
    return len(source)


CONSTANT_ATTRIBUTES = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turns Constant nodes into initializers (NNCF takes a constant input of a MatMul for its weight only there)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    moved = []
    for node in graph.node:
        if node.op_type != "Constant" or node.output[0] in outputs or len(node.attribute) != 1:
            continue
        attribute = node.attribute[0]
        if attribute.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attribute.t)
        elif attribute.name in CONSTANT_ATTRIBUTES:
            value = onnx.helper.get_attribute_value(attribute)
            tensor = onnx.numpy_helper.from_array(np.asarray(value, dtype=CONSTANT_ATTRIBUTES[attribute.name]))
        else:
            continue
        tensor.name = node.output[0]
        moved.append((node, tensor))
    for node, tensor in moved:
        graph.initializer.append(tensor)
        graph.node.remove(node)
    return len(moved)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def share_identical_constants(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Keeps one copy of each distinct constant (type, shape and bytes); returns the copies removed.
    Constants in external files are read one at a time from ``base_dir``.

    Tracing folds a transposed Linear weight once per unrolled step, and onnxslim only ties
    constants below 1000 elements: without this, every attention weight is stored once per step.
    """
    graph = model.graph
    first: dict[tuple, str] = {}
    replaced: dict[str, str] = {}
    unique = []
    for tensor in graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor_data(tensor, base_dir)).digest())
        if key in first:
            replaced[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            unique.append(tensor)
    if not replaced:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(unique)
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in replaced:
                node.input[j] = replaced[name]
    return len(replaced)


# An unrolled sampler repeats every conv once per step, and the tracer writes out each default
# (strides 1, pads 0, ...): 100 of a Conv node's 150 bytes, 8% of a small int8 sampler's file.
DEFAULT_ATTRIBUTES = {
    "Conv": {"dilations": 1, "group": 1, "strides": 1, "pads": 0, "auto_pad": b"NOTSET"},
    "ConvTranspose": {"dilations": 1, "group": 1, "strides": 1, "pads": 0, "output_padding": 0, "auto_pad": b"NOTSET"},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
}


def drop_default_attributes(model: onnx.ModelProto) -> int:
    """Removes attributes equal to their operator's default (a list counts when every entry is the
    default); returns the bytes saved. ``kernel_shape`` stays: it is optional but not a constant."""
    saved = 0
    for node in model.graph.node:
        defaults = DEFAULT_ATTRIBUTES.get(node.op_type)
        if not defaults or node.domain not in ("", "ai.onnx"):
            continue
        keep = []
        for attribute in node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            values = value if isinstance(value, list) else [value]
            if attribute.name in defaults and all(v == defaults[attribute.name] for v in values):
                saved += attribute.ByteSize()
            else:
                keep.append(attribute)
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return saved
