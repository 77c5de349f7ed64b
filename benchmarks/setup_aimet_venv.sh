#!/usr/bin/env bash
# Build a venv with aimet-onnx 2.42.0 on a CPU-only torch, for bench_quant_peers.py (not run in CI).
#
#   bash benchmarks/setup_aimet_venv.sh [VENV]        (default VENV: benchmarks/_work/aimet-venv)
#
# aimet-onnx 2.42.0 itself does not need torchvision, but it requires onnx2torch, which requires
# torchvision, and an unpinned torchvision pulls a CUDA torch of several GB. PyPI's torchvision
# wheels do not import beside the CPU torch 2.13.0 build ("operator torchvision::nms does not
# exist"), and nothing aimet_onnx imports for QuantizationSimModel / load_encodings_to_sim uses
# onnx2torch. So: torch 2.13.0 (CPU) first, then aimet-onnx's own requirements by hand, then
# onnx2torch and aimet-onnx with --no-deps. `pip check` will name the missing torchvision; that
# is expected. onnx / onnxruntime / onnx-ir / onnxscript / numpy are pinned to the project's versions
# so both sides of the benchmark run the same onnxruntime.
set -euo pipefail

VENV="${1:-$(dirname "$0")/_work/aimet-venv}"
PY="${PYTHON:-python3.11}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install torch==2.13.0            # the CPU build (plain `torch` or a range would take a CUDA one)
"$PIP" install onnx==1.23.2 onnx-ir==1.1.0 onnxscript==0.7.2 onnxruntime==1.32.0 numpy==2.4.6 \
    Jinja2 PyYAML 'bokeh>=3.3.0' 'hvplot>=0.10.0' jsonschema osqp pandas psutil pybind11 scikit-learn scipy tqdm
"$PIP" install --no-deps onnx2torch==1.5.15 aimet-onnx==2.42.0
"$VENV/bin/python" -c "import aimet_onnx, torch; from aimet_onnx.quantsim import QuantizationSimModel, load_encodings_to_sim; print('aimet-onnx', aimet_onnx.__version__, 'torch', torch.__version__)"
