#!/usr/bin/env bash
# The CUDA checks, on a machine with an NVIDIA GPU whose onnxruntime is the CPU build (see
# ../shared/GPU.md): install onnxruntime-gpu from wheels carried in .gpuwheels/ (the big wheel in
# parts p_a..p_e, joined here), then run the CUDA tests and fold every model with --providers cpu,cuda.
# Results go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
wheel=.gpuwheels/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat .gpuwheels/p_*/ort.part.* > "$wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" .gpuwheels/p_e/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# CUDA 13 and cuDNN 9 come as nvidia-* pip packages on that image; onnxruntime-gpu 1.31 finds them
# itself (checked on an H200: --providers cpu,cuda passes with LD_LIBRARY_PATH unset)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_verify.py 2>&1 | tail -25
mkdir -p /tmp/folded
for m in models/*.onnx $(find tests/corpus -name '*.onnx' | sort); do
  python3 -m onnxfold "$m" "/tmp/folded/$(basename "$m")" --providers cpu,cuda -v 2>&1 | grep -E "verify on|ok  |FAIL|PASSED|FAILED|error" | head -12
done
