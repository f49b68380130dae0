"""OpenVINO IR writer: each exported ONNX model (float or int8 QDQ) becomes `<kind>.xml` + `<kind>.bin`.

The IR is converted from the ONNX file rather than traced again, so both formats hold the same
graph (an int8 QDQ model turns into OpenVINO FakeQuantize ops and stays int8). Float weights are
kept float32 (`compress_to_fp16=False`): a float IR must agree with onnxruntime to 1e-3. The
sidecar of the ONNX model is reused with format 'openvino'; it is written as `<kind>.openvino.json`
because `<kind>.json` belongs to the ONNX model in the same folder.

Float32 weights do not decide the precision the IR runs at: OpenVINO's CPU plugin computes in bf16
by default on CPUs with AVX512-BF16 or AMX, which puts the 8-step digits sampler far outside that
tolerance (README, "Runtimes and targets"), and a hint written into the IR's rt_info did not change that default. So the sidecar
says which precision the artifact is validated at (`inference_precision`) and that an app has to
ask for it when compiling (`INFERENCE_PRECISION_HINT`).
"""
from __future__ import annotations

import json
from pathlib import Path

from compress import outputs
from compress.errors import UserError
from compress.outputs import staged_files
from export.sidecar import write_sidecar

SIDECAR_SUFFIX = ".openvino.json"
# The precision validation runs the IR at (runtimes/openvino_runner.py pins it on the CPU).
INFERENCE_PRECISION = "f32"
INFERENCE_PRECISION_NOTE = (
    "validated at f32: compile with {'INFERENCE_PRECISION_HINT': 'f32'}. Without that hint OpenVINO's CPU plugin "
    "runs this IR in bf16 on CPUs with AVX512-BF16 or AMX (those whose OPTIMIZATION_CAPABILITIES list BF16): "
    "faster, but no longer within the f32 tolerance of onnxruntime")


def export_openvino(onnx_records: list[dict], out_dir: str | Path) -> list[dict]:
    """Converts every ONNX record (as returned by export_onnx) to IR in ``out_dir``; returns one record per IR."""
    import openvino as ov

    sources = [r for r in onnx_records if r.get("format") == "onnx"]
    if not sources:
        raise UserError("OpenVINO export converts the ONNX models of an export, and none was given")
    out_dir = Path(out_dir)
    with staged_files(out_dir, ".openvino-export-") as stage:
        records = [_convert(ov, record, stage) for record in sources]
    for record in records:
        for key in ("path", "weights", "sidecar"):
            record[key] = str(out_dir / record[key])
    return records


def _convert(ov, onnx_record: dict, stage: Path) -> dict:
    source = Path(onnx_record["path"])
    kind = onnx_record["kind"]
    sidecar = _onnx_sidecar(onnx_record)
    xml, weights = stage / f"{kind}.xml", stage / f"{kind}.bin"
    sidecar.update(format="openvino", file=xml.name, weights_file=weights.name, converted_from=source.name,
                   inference_precision=INFERENCE_PRECISION, inference_precision_note=INFERENCE_PRECISION_NOTE)
    model = ov.convert_model(str(source))
    # Conversion may fold an input into what it feeds (FLUX's timestep / 1000 * 1000 becomes the input itself), and the
    # port then carries both tensors' names: an app asks a port for its name, so only the interface's is kept.
    for ports, specs in ((model.inputs, sidecar["inputs"]), (model.outputs, sidecar["outputs"])):
        for port, spec in zip(ports, specs):
            if spec["name"] in port.get_names():
                port.get_tensor().set_names({spec["name"]})
    compact_fake_quantize_ranges(model)
    # The interface travels inside the IR too, for consumers that only have the .xml.
    model.set_rt_info(json.dumps(sidecar), ["diffusion_compress", "sidecar"])
    ov.save_model(model, str(xml), compress_to_fp16=False)
    _check_interface(ov, xml, sidecar, kind)
    sidecar_path = write_sidecar(stage / f"{kind}{SIDECAR_SUFFIX}", sidecar)
    return {
        "path": xml.name,
        "format": "openvino",
        "kind": kind,
        "bytes": xml.stat().st_size + weights.stat().st_size,
        "sha256": files_sha256([xml, weights]),
        "sidecar": sidecar_path.name,
        "weights": weights.name,
        "source": str(source),
        "batch_size": onnx_record.get("batch_size"),
    }


def compact_fake_quantize_ranges(model) -> int:
    """Gives each FakeQuantize scalar range constants, one node for equal input and output bounds; returns
    the inputs rewired.

    An ONNX QuantizeLinear/DequantizeLinear pair converts to a FakeQuantize with four [1, 1, 1, 1]
    constants, the output bounds equal to the input ones. The values are a few bytes of the .bin, but
    each constant is a layer of the .xml with its shape spelled out: in the 8-step digits W8A8 sampler
    (1032 FakeQuantize ops) they made up 1.06 MB of its 4.74 MB of graph text. Same values, same results.
    """
    import numpy as np
    from openvino import opset13

    rewired = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        sources = [node.input(i).get_source_output() for i in range(1, 5)]
        if not all(s.get_node().get_type_name() == "Constant" for s in sources):
            continue
        values = [s.get_node().get_data() for s in sources]
        new = [opset13.constant(v.reshape(())).output(0) if v.size == 1 and v.ndim else s for s, v in zip(sources, values)]
        for low, high in ((0, 2), (1, 3)):  # input_low = output_low, input_high = output_high
            if values[low].shape == values[high].shape and np.array_equal(values[low], values[high]):
                new[high] = new[low]
        for i, output in enumerate(new):
            if output is not sources[i]:
                node.input(i + 1).replace_source_output(output)
                rewired += 1
    return rewired


def _onnx_sidecar(record: dict) -> dict:
    path = Path(record["sidecar"]) if record.get("sidecar") else Path(record["path"]).with_suffix(".json")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the sidecar {path} of {record['path']}: {e}") from None


def _check_interface(ov, xml: Path, sidecar: dict, kind: str) -> None:
    """Reads the saved IR back: its inputs and output must carry the sidecar's names."""
    model = ov.Core().read_model(str(xml))
    inputs = [p.get_any_name() for p in model.inputs]
    outputs = [p.get_any_name() for p in model.outputs]
    expected_inputs = [i["name"] for i in sidecar["inputs"]]
    expected_outputs = [o["name"] for o in sidecar["outputs"]]
    if inputs != expected_inputs or outputs != expected_outputs:
        raise RuntimeError(f"{kind}.xml has inputs {inputs} and outputs {outputs}; expected {expected_inputs} -> {expected_outputs}")


def files_sha256(files: list[Path]) -> str:
    """One digest over several files (name and bytes of each, in the order given)."""
    return outputs.files_sha256((path.name, path) for path in files)
