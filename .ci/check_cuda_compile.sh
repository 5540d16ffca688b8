#!/usr/bin/env bash
# Compile-only check of every .cu file with nvcc against the installed (CPU) torch's headers.
# Usage: .ci/check_cuda_compile.sh <python> <workdir>
set -euo pipefail
PY=${1:?python}
WORK=${2:?workdir}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "nvcc not found: skipping the CUDA compile check"
  exit 0
fi
mkdir -p "$WORK/whl" "$WORK/headers"
# cusparse/cublas/cusolver headers that torch's CUDA headers include (not in the CPU wheel).
"$PY" -m pip download -q --no-deps -d "$WORK/whl" \
  nvidia-cusparse==12.6.3.3 nvidia-cublas==13.1.1.3 nvidia-cusolver==12.0.4.66
for w in "$WORK"/whl/*.whl; do
  "$PY" - "$w" "$WORK/headers" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if name.startswith("nvidia/") and "/include/" in name:
            z.extract(name, sys.argv[2])
PYEOF
done
mapfile -t INCLUDES < <("$PY" - <<'PYEOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print(p)
PYEOF
)
INC_FLAGS=()
for p in "${INCLUDES[@]}"; do INC_FLAGS+=("-I$p"); done
for d in "$WORK"/headers/nvidia/*/include; do INC_FLAGS+=("-I$d"); done
status=0
while IFS= read -r -d '' cu; do
  echo "nvcc -c $cu"
  if ! "$NVCC" -c "$cu" -o "$WORK/$(basename "$cu").o" "${INC_FLAGS[@]}" -I"$ROOT/csrc" -O3 \
      --expt-relaxed-constexpr -Xcompiler -fPIC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -gencode arch=compute_90,code=sm_90; then
    status=1
  fi
done < <(find "$ROOT/csrc" -name '*.cu' -print0)
exit $status
