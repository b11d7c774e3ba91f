"""Run-time ISA dispatch: one build picks the best ISA of the CPU; PYLLM_FORCE_ISA overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from pyllm import _core as core

AVX512_BITS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avx512bf16")


def _active_isa(force: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYLLM_FORCE_ISA"}
    if force is not None:
        env["PYLLM_FORCE_ISA"] = force
    return subprocess.run([sys.executable, "-c", "import pyllm._core as c; print(c.active_isa())"],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=60)


def test_best_isa_without_march_native() -> None:
    """The build compiles every ISA's kernels and picks the best one the CPU has at run time."""
    compiled = core.compiled_isas()
    assert "scalar" in compiled
    feats = core.cpu_features()
    proc = _active_isa(None)
    assert proc.returncode == 0, proc.stderr
    best = core.available_isas()[-1]
    assert proc.stdout.strip() == best
    if all(feats[b] for b in AVX512_BITS) and feats["avx2"]:
        assert "avx512" in compiled and best == "avx512"  # e.g. this Zen4 box


@pytest.mark.parametrize("isa", ["scalar", *[i for i in ("avx2", "avx512", "neon")
                                             if i in core.available_isas()]])
def test_force_isa(isa: str) -> None:
    proc = _active_isa(isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


def test_unknown_forced_isa_is_a_clear_error() -> None:
    proc = _active_isa("bogus")
    assert proc.returncode != 0
    assert "unknown ISA 'bogus'" in proc.stderr
    assert "Segmentation" not in proc.stderr


def test_default_threads_follow_the_affinity_mask() -> None:
    """Pinned to one CPU (taskset), the default pool of the extension has one thread.

    The C++ default used to be the machine's physical cores whatever the affinity mask, so a
    pinned process ran several threads on one CPU; it agrees with pyllm.sysinfo now.
    """
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import pyllm._core as c; from pyllm.sysinfo import available_cpus; "
            "print(c.cpu_features()['available_cpus'], c.get_num_threads(), available_cpus())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"]
    # Unpinned, the extension's count of usable CPUs matches the Python one.
    from pyllm.sysinfo import available_cpus
    assert core.cpu_features()["available_cpus"] == available_cpus()
    assert 1 <= core.get_num_threads() <= available_cpus()
