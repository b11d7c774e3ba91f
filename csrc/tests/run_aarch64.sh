#!/usr/bin/env bash
# The NEON path, run where there is no ARM machine: cross-compiles the C++ core and its tests for
# aarch64 (Debian's g++-aarch64-linux-gnu) and runs them under qemu-user. test_threadpool,
# test_matmul (every kernel of the neon and scalar ISAs against the float64 reference),
# test_placement and test_forward_isa (every ISA's forward against the scalar one) run as on
# x86; then the forward of the same random model on aarch64 (neon, and scalar) is compared with
# the x86 build's scalar result. Exits non-zero on any failure or hang.
#
#   csrc/tests/run_aarch64.sh [BUILD_ROOT]      (default BUILD_ROOT: build/cxx-tests)
#
# Needs: g++-aarch64-linux-gnu qemu-user (apt), cmake. Environment: PYLLM_TEST_JOBS (2),
# PYLLM_TEST_TIMEOUT (seconds per program, 1200: emulation is ~10-30x slower).
set -euo pipefail
cd "$(dirname "$0")/../.."

root=${1:-build/cxx-tests}
jobs=${PYLLM_TEST_JOBS:-2}
limit=${PYLLM_TEST_TIMEOUT:-1200}
tests=(test_threadpool test_matmul test_placement test_forward_isa)
for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: $tool is needed (apt install g++-aarch64-linux-gnu qemu-user; pip install cmake)" >&2
    exit 1
  }
done
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
run=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
mkdir -p "$root"

# the x86 reference: the scalar ISA's forward (F32 math, as the neon kernels), from run.sh's
# plain build when it is there (the same configuration)
x86="$root/plain"
echo "== x86 reference forward ($x86)"
cmake -S . -B "$x86" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPYLLM_BUILD_TESTS=ON \
  >"$x86.configure.log" 2>&1 || { cat "$x86.configure.log" >&2; exit 1; }
cmake --build "$x86" -j "$jobs" --target test_forward_isa
PYLLM_FORCE_ISA=scalar "$x86/test_forward_isa" --write "$root/forward-x86.bin"

arm="$root/aarch64"
echo "== aarch64 build under qemu ($arm)"
t0=$SECONDS
cmake -S . -B "$arm" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPYLLM_BUILD_TESTS=ON \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/csrc/tests/aarch64-linux-gnu.cmake" \
  >"$arm.configure.log" 2>&1 || { cat "$arm.configure.log" >&2; exit 1; }
cmake --build "$arm" -j "$jobs" --target "${tests[@]}"
echo "   built in $((SECONDS - t0)) s"
for t in "${tests[@]}"; do
  t0=$SECONDS
  if ! timeout "$limit" "${run[@]}" "$arm/$t"; then
    echo "error: $t failed on aarch64 (exit status above; 124 = hung past ${limit} s)" >&2
    exit 1
  fi
  echo "   $t passed in $((SECONDS - t0)) s"
done
for isa in neon scalar; do
  # the neon and scalar kernels are the same F32 math as x86's scalar ones, in other orders
  if ! PYLLM_FORCE_ISA=$isa timeout "$limit" "${run[@]}" "$arm/test_forward_isa" \
      --compare "$root/forward-x86.bin" 2e-5; then
    echo "error: the aarch64 ($isa) forward differs from the x86 one" >&2
    exit 1
  fi
done
echo "== aarch64 tests passed"
