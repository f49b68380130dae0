"""Export targets for ONNX: what a family of runtimes needs from the graph.

A target fixes two things that differ between a desktop runtime and an NPU:
- shapes: NPU execution providers (QNN, OpenVINO NPU) compile one static graph, so the batch
  is fixed at export time (1 unless the user asks for another);
- the QDQ layout that `compress/quantize.py` emits for this target: which integer types
  activations, weights and biases get, how they are scaled, which ops are left in float, and
  which quantizer writes it (NNCF, or onnxruntime's own QNN tooling for the QNN targets).

`QDQLayout` states a layout; `read_qdq_layout` reads the one a file actually has, and
`QDQLayout.mismatches` compares the two. This module quantizes nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from compress.errors import unknown_choice
from export.onnx_graph import input_uses

DEFAULT_STATIC_BATCH = 1


@dataclass(frozen=True)
class QDQLayout:
    """How an int8 (or w8a16) ONNX model for a target lays out its QuantizeLinear/DequantizeLinear pairs."""

    activation_dtype: str  # "int8", "uint8" or "uint16"
    activation_symmetric: bool  # zero point fixed at 0 (int8) / mid-range; False: min-max asymmetric
    weight_dtype: str  # "int8" or "uint8"
    weight_symmetric: bool
    weight_per_channel: bool  # activations are always per tensor: every NPU EP requires it
    # ONNX QuantizeLinear accepts 16-bit types only from opset 21, so 16-bit Q/DQ go into onnxruntime's
    # com.microsoft domain (onnxruntime's quantizer also moves such a model to opset 21 on its own).
    contrib_qdq_ops: bool = False
    activation_per_tensor: bool = True
    # "int32": conv/gemm biases are DequantizeLinear(int32, input scale x weight scale, zero point 0).
    bias_dtype: str = "float32"
    # Weighted ops whose weights stay per tensor even when weight_per_channel is set.
    per_tensor_weight_ops: tuple[str, ...] = ()
    # None: the quantizer's own op support decides what stays float (NNCF leaves normalizations,
    # softmax and sigmoid float); a tuple: every op of the network gets Q/DQ on its inputs and
    # outputs but these types (the solver's arithmetic outside the network stays float either way).
    unquantized_op_types: tuple[str, ...] | None = None
    engine: str = "nncf"  # "nncf", or "onnxruntime-qnn": onnxruntime.quantization with get_qnn_qdq_config
    nncf_target_device: str = "ANY"  # NNCF's hardware config, when NNCF is the engine

    @property
    def nncf_preset(self) -> str | None:
        """NNCF's QuantizationPreset that yields this layout, or None where NNCF does not write it."""
        if self.engine != "nncf" or self.weight_dtype != "int8" or not self.weight_symmetric:
            return None
        return "performance" if self.activation_symmetric else "mixed"

    def ort_quantize_kwargs(self) -> dict:
        """Keyword arguments for onnxruntime.quantization.quantize_static (QDQ format) for this layout's types;
        the QNN layouts also need get_qnn_qdq_config's per-op overrides, which compress quantize adds."""
        from onnxruntime.quantization import QuantFormat, QuantType

        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}
        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": types[self.activation_dtype],
            "weight_type": types[self.weight_dtype],
            "per_channel": self.weight_per_channel,
            "extra_options": {
                "ActivationSymmetric": self.activation_symmetric,
                "WeightSymmetric": self.weight_symmetric,
                "UseQDQContribOps": self.contrib_qdq_ops,
            },
        }

    def describe(self) -> dict:
        """As a sidecar records it (JSON types: lists, not tuples)."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**fields, "nncf_preset": self.nncf_preset}

    def mismatches(self, emitted: dict) -> list[str]:
        """Where ``emitted`` (from `read_qdq_layout`) departs from this layout; empty when the file has it."""
        found = []

        def differ(what, expected, actual):
            if actual is not None and actual != expected:
                found.append(f"{what}: {actual!r}, expected {expected!r}")

        if emitted.get("activation_dtype") is not None:
            differ("activation dtype", self.activation_dtype, emitted["activation_dtype"])
            differ("activation symmetric", self.activation_symmetric, emitted["activation_symmetric"])
            differ("activations per tensor", self.activation_per_tensor, emitted["activation_per_tensor"])
        differ("weight dtype", self.weight_dtype, emitted.get("weight_dtype"))
        differ("weight symmetric", self.weight_symmetric, emitted.get("weight_symmetric"))
        for op, per_channel in emitted.get("weight_per_channel", {}).items():
            differ(f"{op} weights per channel", self.weight_per_channel and op not in self.per_tensor_weight_ops, per_channel)
        differ("bias dtype", self.bias_dtype, emitted.get("bias_dtype"))
        differ("Q/DQ in com.microsoft", self.contrib_qdq_ops, emitted.get("contrib_qdq_ops"))
        return found


# Input index of the weight, and of the bias, of each weighted op.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
CONTRIB_DOMAIN = "com.microsoft"


def _one(values: set):
    """The single value of a set, its sorted list when it holds several, None when empty."""
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values, key=str)


def read_qdq_layout(model) -> dict:
    """The QDQ layout a model actually has, read from its Q/DQ nodes and their constants.

    Activation quantizers are the QuantizeLinear nodes on computed tensors; a DequantizeLinear on an
    initializer is a weight when it feeds a weighted op's weight input, a bias when it feeds its
    bias input, and a stored constant otherwise. Symmetric means every zero point sits at the
    type's midpoint (0 for signed types, 128 / 32768 for unsigned ones)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = input_uses(graph)
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    dq_outputs = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}

    def params(node):
        scale = numpy_helper.to_array(inits[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            return scale, numpy_helper.to_array(inits[node.input[2]])
        # No zero point: 0 of the integer type, the stored tensor's for a DequantizeLinear on a constant, else uint8.
        dtype = helper.tensor_dtype_to_np_dtype(inits[node.input[0]].data_type) if node.input[0] in inits else np.uint8
        return scale, np.zeros(scale.shape, dtype)

    def at_midpoint(zp) -> bool:
        name = str(zp.dtype)  # by name: np.iinfo knows no int4 / uint4
        midpoint = 2 ** (int(name.lstrip("uint")) - 1) if name.startswith("u") else 0
        return bool(np.all(zp.astype(np.int64) == midpoint))

    act_dtypes, act_symmetric, act_per_tensor = set(), [], set()
    weight_dtypes, weight_symmetric, per_channel = set(), [], {}
    bias_dtypes, constants, domains = set(), {}, set()
    for n in qdq:
        scale, zp = params(n)
        if n.input[0] not in inits:  # a quantizer on a computed tensor, or its dequantizer
            domains.add(n.domain == CONTRIB_DOMAIN)
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            act_dtypes.add(str(zp.dtype))
            act_symmetric.append(at_midpoint(zp))
            act_per_tensor.add(scale.ndim == 0)
            continue
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        roles = set()
        for user, j in uses.get(n.output[0], []):
            if WEIGHT_INPUT.get(user.op_type) == j or (user.op_type == "MatMul" and j == 0):
                roles.add(("weight", user.op_type))
            elif BIAS_INPUT.get(user.op_type) == j:
                roles.add(("bias", user.op_type))
            else:
                roles.add(("constant", None))
        for role, op in roles:
            if role != "constant":
                domains.add(n.domain == CONTRIB_DOMAIN)
            if role == "weight":
                weight_dtypes.add(str(zp.dtype))
                weight_symmetric.append(at_midpoint(zp))
                per_channel.setdefault(op, set()).add(scale.ndim == 1)
            elif role == "bias":
                bias_dtypes.add(str(zp.dtype))
            else:
                constants[str(zp.dtype)] = constants.get(str(zp.dtype), 0) + 1
    unquantized = {}
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        reads_float = [i for j, i in enumerate(n.input) if i and i not in inits and i not in dq_outputs
                       and not (BIAS_INPUT.get(n.op_type) == j)]
        # A float bias matters only on a layer that is quantized (its weight read through a DequantizeLinear).
        if (BIAS_INPUT.get(n.op_type) is not None and len(n.input) > 2 and n.input[2] and n.input[2] not in dq_outputs
                and n.input[1] in dq_outputs):
            bias_dtypes.add("float32")
        if reads_float:
            unquantized[n.op_type] = unquantized.get(n.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "activation_dtype": _one(act_dtypes),
        # asymmetric quantizers may still land on the midpoint: symmetric means all of them do
        "activation_symmetric": all(act_symmetric) if act_symmetric else None,
        "activation_per_tensor": _one(act_per_tensor),
        "weight_dtype": _one(weight_dtypes),
        "weight_symmetric": all(weight_symmetric) if weight_symmetric else None,
        # True / False per op type; a list where some weights of that op are per channel and some not
        "weight_per_channel": {op: _one(v) for op, v in sorted(per_channel.items())},
        "bias_dtype": _one(bias_dtypes),
        # of the quantizers (activations, weights, biases); stored constants may be dequantized in either domain
        "contrib_qdq_ops": _one(domains),
        "stored_constants": dict(sorted(constants.items())),
        # op types of the nodes that read a tensor no DequantizeLinear produced (float compute, or integer shape arithmetic)
        "unquantized_ops": dict(sorted(unquantized.items())),
        "opset": opset,
    }


@dataclass(frozen=True)
class ExportTarget:
    name: str
    summary: str
    static_batch: bool
    qdq: QDQLayout
    execution_providers: tuple[str, ...]  # where the artifact is meant to run, first choice first

    def batch_size(self, requested: int | None) -> int | None:
        """The export batch: the user's, else None (dynamic) or the fixed batch a static target needs."""
        if requested is not None:
            return requested
        return DEFAULT_STATIC_BATCH if self.static_batch else None

    def describe(self) -> dict:
        return {"name": self.name, "static_batch": self.static_batch, "qdq": self.qdq.describe(),
                "execution_providers": list(self.execution_providers)}


# onnxruntime's x86 int8 kernels (QLinearConv) take uint8 activations with int8 weights, so that is what
# compress quantize writes (NNCF's mixed preset, activations moved to uint8); OpenVINO reads the same pairs.
# TensorRT is not listed: it takes symmetric int8 activations only.
_GENERIC = QDQLayout("uint8", False, "int8", True, True)
# OpenVINO's NPU plugin reads the same layout; NNCF's NPU hardware config accepts it (q8_a activations
# per tensor, symmetric or not; q8_w_sym weights) and places the quantizers.
_OPENVINO_NPU = replace(_GENERIC, nncf_target_device="NPU")
# QNN HTP runs integer ops only (a float node falls back to the CPU), so every op is quantized: asymmetric
# unsigned activations per tensor, symmetric int8 weights per output channel (MatMul per tensor: QNN has
# no per-channel MatMul), int32 biases. onnxruntime's QNN tooling (get_qnn_qdq_config) writes it.
_QNN_W8A8 = QDQLayout("uint8", False, "int8", True, True, bias_dtype="int32", per_tensor_weight_ops=("MatMul",),
                      unquantized_op_types=("Cast",), engine="onnxruntime-qnn")
# Qualcomm's recommended w8a16 for diffusion UNets: 16-bit activations keep softmax/GroupNorm accurate.
_QNN_W8A16 = replace(_QNN_W8A8, activation_dtype="uint16", contrib_qdq_ops=True)

TARGETS = {
    t.name: t
    for t in (
        ExportTarget("generic", "dynamic batch; uint8 asymmetric activations, int8 weights (onnxruntime CPU, OpenVINO)", False, _GENERIC,
                     ("CPUExecutionProvider", "CUDAExecutionProvider")),
        ExportTarget("npu-qnn", "static batch, uint8 activations (Qualcomm HTP via onnxruntime QNN EP)", True, _QNN_W8A8,
                     ("QNNExecutionProvider",)),
        ExportTarget("npu-qnn-w8a16", "static batch, uint16 activations (Qualcomm HTP via onnxruntime QNN EP)", True, _QNN_W8A16,
                     ("QNNExecutionProvider",)),
        ExportTarget("npu-openvino", "static batch, uint8 activations, int8 weights (Intel NPU via OpenVINO)", True, _OPENVINO_NPU,
                     ("OpenVINOExecutionProvider",)),
    )
}


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise unknown_choice("export target", name, TARGETS)
    return TARGETS[name]
