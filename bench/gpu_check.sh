#!/usr/bin/env bash
# The GPU check: one prepared run for a lent GPU machine (no network, minutes of device time).
#
#   bash bench/gpu_check.sh --prepare          here: copy what the machine lacks into .gpu/
#   bash bench/gpu_check.sh [cuda|opencl]      there (device tool: carry .gpu): build, test, bench
#
# It builds pyllm with the backend (CUDA for the machine's own architecture only, to save minutes;
# PYLLM_CUDA_ARCH overrides), prints the devices, runs tests/test_gpu.py on tiny models (every
# weight type against the float64 reference, cache types, batched sequences, states, errors;
# the SmolLM2 tests need the 92 MiB model, which cannot travel), then `pyllm bench` with every
# layer offloaded on synthetic files of real shapes (SHAPES, default a 7B in Q4_0 and Q4_K_M)
# and the same files on the CPU for reference. Logs go to $OUT (the device tool's) or
# /tmp/pyllm-gpu-check. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.gpu

if [ "${1:-}" = "--prepare" ]; then
  shared=${SHARED:-../shared}
  mkdir -p "$kit/tools" "$kit/fixtures/vocab" "$kit/wheels"
  cp "$shared/tools/synth_gguf.py" "$kit/tools/"
  cp "$shared/fixtures/vocab/ggml-vocab-llama-spm.gguf" "$kit/fixtures/vocab/"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$kit/wheels" gguf
  grep -qx "/$kit/" .git/info/exclude 2>/dev/null || echo "/$kit/" >> .git/info/exclude
  du -sh "$kit"
  exit 0
fi

kind=${1:-cuda}
python=$(command -v "${PYTHON:-python3}")
case "$python" in /*) ;; *) python="$PWD/$python" ;; esac  # the runs below change directory
out=${OUT:-/tmp/pyllm-gpu-check}
mkdir -p "$out"
: > "$out/summary.txt"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$out/summary.txt"; }

case "$kind" in
  cuda)
    flags=(-Ccmake.define.PYLLM_CUDA=ON)
    arch=${PYLLM_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
      | head -1 | tr -d '.')}
    [ -n "$arch" ] && flags+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=${arch}-real")
    ;;
  opencl) flags=(-Ccmake.define.PYLLM_OPENCL=ON) ;;
  *) echo "error: unknown backend '$kind' (cuda or opencl)" >&2; exit 2 ;;
esac

log "build ($kind, ${flags[*]})"
t0=$SECONDS
"$python" -m pip install --quiet --no-deps --no-build-isolation -Cbuild-dir=build/gpu-check \
  "${flags[@]}" . 2>&1 | tee "$out/build.log"
log "built in $((SECONDS - t0)) s"
(cd /tmp && "$python" -m pyllm info --devices) | tee -a "$out/summary.txt"

if [ -d "$kit/wheels" ]; then  # what the machine lacks, carried in .gpu/
  "$python" -m pip install --quiet --no-index --no-deps --upgrade --target /tmp/pyllm-gpu-site \
    "$kit"/wheels/*.whl
  export PYTHONPATH=/tmp/pyllm-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

log "tests/test_gpu.py on tiny models"
set +e
# -P: the installed pyllm, not the source tree in the working directory
"$python" -P -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
  -k "not smollm2 and not engine and not cli_run" 2>&1 | tee "$out/tests.log"
rc=${PIPESTATUS[0]}
set -e
log "tests exit status $rc"

models=/tmp/pyllm-gpu-models
mkdir -p "$models"
for spec in ${SHAPES:-llama2-7b:Q4_0 llama2-7b:Q4_K_M}; do
  shape=${spec%%:*} type=${spec##*:}
  file="$models/$shape-$type.gguf"
  [ -f "$file" ] || "$python" "$kit/tools/synth_gguf.py" --shape "$shape" --type "$type" -o "$file"
  log "bench $shape $type"
  for ngl in -1 0; do  # every layer on the device, then the CPU for reference
    if ! (cd /tmp && "$python" -m pyllm bench -m "$file" -ngl "$ngl" --device "$kind" \
        -p "${N_PROMPT:-512}" -n "${N_GEN:-128}" -r "${REPS:-3}" 2>&1) | tee -a "$out/summary.txt"
    then
      log "bench failed (-ngl $ngl); the line above says why"
      rc=1
    fi
  done
done
exit "$rc"
