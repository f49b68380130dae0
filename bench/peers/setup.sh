#!/usr/bin/env bash
# Creates one virtual environment per peer so that their pins never touch ours.
# torch==2.13.0 goes in FIRST: it is the CPU wheel on disk (as in our env);
# an unpinned torch pulled in by a peer would fetch gigabytes of CUDA wheels.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"

make_venv() {  # name, then the peer's packages
  local venv="$here/$1"; shift
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"
  "$venv/bin/pip" install -q "torch==2.13.0" "$@"
  "$venv/bin/pip" freeze > "$venv/freeze.txt"
}

want="${1:-all}"
if [ "$want" = all ] || [ "$want" = optimum ]; then
  # Optimum's ONNX exporter and its ONNX Runtime diffusion pipelines.
  make_venv .venv-optimum "optimum-onnx[onnxruntime]==0.1.0" diffusers
fi
if [ "$want" = all ] || [ "$want" = openvino ]; then
  # optimum-intel exports OpenVINO IR (int8 weights, hybrid W8A8 through NNCF);
  # OpenVINO GenAI runs it; openvino-tokenizers converts the tokenizer.
  make_venv .venv-openvino "optimum-intel[openvino,nncf]" openvino-genai openvino-tokenizers diffusers
  # optimum-intel pulls torchvision from PyPI, built for the CUDA torch: with our CPU torch its import
  # fails ("operator torchvision::nms does not exist") and takes transformers down. The
  # text-to-image export does not need it.
  "$here/.venv-openvino/bin/pip" uninstall -y -q torchvision || true
  "$here/.venv-openvino/bin/pip" freeze > "$here/.venv-openvino/freeze.txt"
fi
