"""ONNX weights beyond the 2 GiB protobuf limit: one external-data file per export, each distinct tensor once.

A Stable-Diffusion-size export holds the UNet in `sampler.onnx` and in `denoiser.onnx`, and the
VAE decoder in the sampler and in `vae_decoder.onnx`. Written as separate external-data files
that is every weight twice (3.44 GB per UNet copy); here every graph of the export points into
one `weights.data`, where a tensor whose bytes are already stored is not stored again. The
graphs stay standard ONNX external data (location, offset, length), so onnxruntime, OpenVINO,
NNCF and `onnx.load` read them unchanged.

The graphs are handled without their weights in memory: `export.onnx_graph.tensor_data` reads a
tensor's bytes from wherever they are (the proto, or the per-tensor files the tracer writes for
large models), one tensor at a time.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from export.onnx_graph import tensor_bytes, tensor_data

WEIGHTS_FILE = "weights.data"
# A graph with this many bytes of weights keeps them in the folder's weights.data: the protobuf limit is
# 2 GiB, and below it an export's sampler and denoiser would each hold their own copy of the network.
EXTERNAL_DATA_BYTES = 1_000_000_000
ALIGNMENT = 4096  # page-aligned offsets let a runtime map each tensor straight from the file
MIN_EXTERNAL_BYTES = 1024  # smaller tensors (shapes, coefficients) stay inside the graph


class WeightStore:
    """A folder's one external-data file (`WEIGHTS_FILE`), appended to as graphs are written; created on first use."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / WEIGHTS_FILE
        self._file = None
        self._stored: dict[bytes, tuple[int, int]] = {}

    def put(self, data: bytes) -> tuple[int, int]:
        """(offset, length) of ``data`` in the file, appending it unless the same bytes are already there."""
        key = hashlib.sha256(data).digest()
        if key not in self._stored:
            if self._file is None:
                self._file = open(self.path, "wb")
            offset = -self._file.tell() % ALIGNMENT + self._file.tell()
            self._file.seek(offset)
            self._file.write(data)
            self._stored[key] = (offset, len(data))
        return self._stored[key]

    def move_weights(self, model: onnx.ModelProto, base_dir: Path | None = None) -> int:
        """Points every initializer of at least MIN_EXTERNAL_BYTES into this file; returns the bytes the graph references."""
        referenced = 0
        for tensor in model.graph.initializer:
            data = tensor_data(tensor, base_dir)
            if len(data) < MIN_EXTERNAL_BYTES:
                if uses_external_data(tensor):
                    _inline(tensor, data)
                continue
            offset, length = self.put(data)
            _clear_data(tensor)
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            referenced += length
        return referenced

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_onnx(model: onnx.ModelProto, path: Path, store: WeightStore, base_dir: Path | None = None) -> int:
    """Writes ``model`` to ``path``: inside the one file, or with its weights in ``store`` when they are large
    or already external (read from ``base_dir``). Returns the bytes of the file and of the weights it reads."""
    external = any(uses_external_data(t) for t in model.graph.initializer)
    referenced = 0
    if external or sum(tensor_bytes(t) for t in model.graph.initializer) >= EXTERNAL_DATA_BYTES:
        referenced = store.move_weights(model, base_dir)
    onnx.save_model(model, str(path))
    return Path(path).stat().st_size + referenced


def _clear_data(tensor: onnx.TensorProto) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]


def _inline(tensor: onnx.TensorProto, data: bytes) -> None:
    _clear_data(tensor)
    tensor.raw_data = data
    tensor.data_location = onnx.TensorProto.DEFAULT


def external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file refers to (none for a self-contained one)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _all_tensors(model) if uses_external_data(t)}
    return [path.parent / location for location in sorted(locations)]


def onnx_bytes(path: Path) -> int:
    """An ONNX file's size with the external bytes it reads (a shared weights file counts in each graph for what it uses)."""
    model = onnx.load(str(path), load_external_data=False)
    return Path(path).stat().st_size + sum(tensor_bytes(t) for t in model.graph.initializer if uses_external_data(t))


def copy_onnx(path: Path, folder: Path, store: WeightStore) -> int:
    """Copies an ONNX file into ``folder``; weights it reads from another folder's file move into ``store``
    (only this graph's tensors, not the whole shared file). Returns the bytes as `save_onnx` does."""
    target = Path(folder) / path.name
    if not external_files(path):
        shutil.copy2(path, target)
        return target.stat().st_size
    return save_onnx(onnx.load(str(path), load_external_data=False), target, store, path.parent)


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t

