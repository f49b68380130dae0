"""Export targets for ONNX: what a family of runtimes needs from the graph.

A target fixes two things that differ between a desktop runtime and an NPU:
- shapes: NPU execution providers (QNN, OpenVINO NPU) compile one static graph, so the batch
  is fixed at export time (1 unless the user asks for another);
- the QDQ layout that `compress/quantize.py` should emit for this target: which integer types
  activations and weights get and how they are scaled. `QDQLayout` states it once and maps it
  onto the two quantizers this project can call (NNCF and onnxruntime.quantization).

The layout is a description only; this module quantizes nothing.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from compress.errors import UserError

DEFAULT_STATIC_BATCH = 1


@dataclass(frozen=True)
class QDQLayout:
    """How an int8 (or w8a16) ONNX model for a target lays out its QuantizeLinear/DequantizeLinear pairs."""

    activation_dtype: str  # "int8", "uint8" or "uint16"
    activation_symmetric: bool  # zero point fixed at 0 (int8) / mid-range; False: min-max asymmetric
    weight_dtype: str  # "int8" or "uint8"
    weight_symmetric: bool
    weight_per_channel: bool  # activations are always per tensor: every NPU EP requires it
    # ONNX QuantizeLinear accepts 16-bit types only from opset 21, and GroupNormalization changes
    # meaning at 21, so 16-bit Q/DQ go into onnxruntime's com.microsoft domain instead.
    contrib_qdq_ops: bool = False
    activation_per_tensor: bool = True

    @property
    def nncf_preset(self) -> str | None:
        """NNCF's QuantizationPreset that yields this layout, or None where NNCF cannot (16-bit activations)."""
        if self.activation_dtype == "uint16" or self.weight_dtype != "int8" or not self.weight_symmetric:
            return None
        return "performance" if self.activation_symmetric else "mixed"

    def ort_quantize_kwargs(self) -> dict:
        """Keyword arguments for onnxruntime.quantization.quantize_static (QDQ format) that give this layout."""
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
        return {**asdict(self), "nncf_preset": self.nncf_preset}


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


# CPU (VNNI), CUDA, TensorRT and OpenVINO all run symmetric int8 activations; TensorRT runs nothing else.
_GENERIC_INT8 = QDQLayout("int8", True, "int8", True, True)
# QNN HTP: asymmetric unsigned activations per tensor, symmetric int8 weights per output channel.
_QNN_W8A8 = QDQLayout("uint8", False, "int8", True, True)
# Qualcomm's recommended w8a16 for diffusion UNets: 16-bit activations keep softmax/GroupNorm accurate.
_QNN_W8A16 = QDQLayout("uint16", False, "int8", True, True, contrib_qdq_ops=True)

TARGETS = {
    t.name: t
    for t in (
        ExportTarget("generic", "dynamic batch; onnxruntime CPU/CUDA/TensorRT, OpenVINO", False, _GENERIC_INT8,
                     ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")),
        ExportTarget("npu-qnn", "static batch, uint8 activations (Qualcomm HTP via onnxruntime QNN EP)", True, _QNN_W8A8,
                     ("QNNExecutionProvider",)),
        ExportTarget("npu-qnn-w8a16", "static batch, uint16 activations (Qualcomm HTP via onnxruntime QNN EP)", True, _QNN_W8A16,
                     ("QNNExecutionProvider",)),
        ExportTarget("npu-openvino", "static batch, int8 activations (Intel NPU via OpenVINO)", True, _GENERIC_INT8,
                     ("OpenVINOExecutionProvider",)),
    )
}


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        close = difflib.get_close_matches(name, TARGETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown export target {name!r}{hint} (available: {', '.join(TARGETS)})")
    return TARGETS[name]
