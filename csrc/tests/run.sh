#!/usr/bin/env bash
# Builds and runs the C++ tests (csrc/tests: test_threadpool, test_matmul, test_placement,
# test_forward_isa, test_embedding_file) twice: a plain Release build and an AddressSanitizer +
# UndefinedBehaviorSanitizer build. Only the test
# targets are built (-j2 by default), in build folders outside the source tree. Exits non-zero
# on any build error, test failure, sanitizer report or hang.
#
#   csrc/tests/run.sh [BUILD_ROOT]      (default BUILD_ROOT: build/cxx-tests)
#
# Environment: PYLLM_TEST_JOBS (parallel compile jobs, 2), PYLLM_TEST_TIMEOUT (seconds one test
# program may run before it counts as hung, 600).
set -euo pipefail
cd "$(dirname "$0")/../.."

root=${1:-build/cxx-tests}
jobs=${PYLLM_TEST_JOBS:-2}
limit=${PYLLM_TEST_TIMEOUT:-600}
tests=(test_threadpool test_matmul test_placement test_forward_isa test_embedding_file)

if ! command -v cmake >/dev/null 2>&1 && [ -n "${VIRTUAL_ENV:-}" ]; then
  # CI's fresh virtual environment: the package build got cmake in an isolated environment only.
  python -m pip install --quiet cmake ninja
fi
if ! command -v cmake >/dev/null 2>&1; then
  echo "error: cmake is needed to build the C++ tests (pip install cmake ninja)" >&2
  exit 1
fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

# A sanitizer finding must fail the run, not just print.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_build() {  # NAME BUILD_TYPE CMAKE_ARGS...
  local name=$1 type=$2
  shift 2
  local dir="$root/$name"
  echo "== C++ tests, $name build ($dir)"
  local t0=$SECONDS
  cmake -S . -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE="$type" -DPYLLM_BUILD_TESTS=ON \
    "$@" >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log" >&2; return 1; }
  cmake --build "$dir" -j "$jobs" --target "${tests[@]}"
  echo "   built in $((SECONDS - t0)) s"
  for t in "${tests[@]}"; do
    t0=$SECONDS
    if ! timeout "$limit" "$dir/$t"; then
      echo "error: $t failed in the $name build (exit status above; 124 = hung past ${limit} s)" >&2
      return 1
    fi
    echo "   $t passed in $((SECONDS - t0)) s"
  done
}

mkdir -p "$root"
run_build plain Release
# -O1 keeps the sanitizer build quick to compile while still inlining the hot kernels.
run_build asan RelWithDebInfo -DPYLLM_SANITIZE=ON -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g"
echo "== C++ tests passed"
