#!/usr/bin/env bash
# ftd's CUDA paths on a real NVIDIA GPU (docs/gpu.md): SFT bf16/fp32, the bf16 merge vs peft, the
# reference stage, the CUDA targets' skip reasons, ftd vs plain TRL. About 3 minutes on one H200.
#
#   bash scripts/gpu_check.sh wheels     # where pip reaches a registry: the pinned wheels into .whl/
#   bash scripts/gpu_check.sh [OUT_DIR]  # on the GPU machine (needs python3 with a CUDA torch):
#                                        # installs .whl/ (or the pins, when there is no .whl/), runs
#
# The GPU machine's own torch is used (a CUDA build is several GB); everything else ftd's stages
# import is pinned here to the versions pyproject.toml resolves to, and installed into a private
# folder, never into the machine's environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=(transformers==4.57.6 trl==1.16.0 peft==0.21.2 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19
      huggingface_hub==0.36.2 tokenizers==0.22.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 typing_extensions==4.16.0)

if [ "${1:-}" = wheels ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp "${platforms[@]}" -d .whl "${PINS[@]}"
fi

OUT=${1:-artifacts/gpu-check}
mkdir -p "$OUT"
SITE=$(mktemp -d)/site
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
else
  "$PY" -m pip install -q --no-deps --target "$SITE" "${PINS[@]}"
fi
export PYTHONPATH="$SITE:$PWD" HF_DATASETS_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# The whole log is kept; the terminal gets the checks and the tables.
set +e
WORK=$(mktemp -d)  # the 1B model, adapters and merged copies (~12 GB): never under OUT
"$PY" scripts/gpu_check.py --out "$OUT" --work "$WORK" > "$OUT/gpu_check.log" 2>&1
status=$?
set -e
rm -rf "$WORK"
grep -E '^\[(pass|FAIL|n/a)\]|^gpu check:|Error|Traceback' "$OUT/gpu_check.log" | tail -60
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
[ $status -ne 0 ] && tail -40 "$OUT/gpu_check.log"
exit $status
