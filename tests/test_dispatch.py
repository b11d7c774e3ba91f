"""Run-time ISA dispatch: one build picks the best ISA of the CPU; PYLLM_FORCE_ISA overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from pyllm import _core as core
from pyllm.formats.gguf import GGMLType
from pyllm.formats.qtypes import weight_types
from tests.test_repack import REPACKED

# The types with a rows16 layout (csrc/quant/repack.cc), as tests/test_repack.py lists them
REPACK_TYPES = tuple(GGMLType[name] for name in REPACKED)
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
    pinned process ran several threads on one CPU; it agrees with pyllm.runtime.sysinfo now.
    """
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "import pyllm._core as c; from pyllm.runtime.sysinfo import available_cpus; "
            "print(c.cpu_features()['available_cpus'], c.get_num_threads(), available_cpus())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tempfile.gettempdir(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"]
    # Unpinned, the extension's count of usable CPUs matches the Python one.
    from pyllm.runtime.sysinfo import available_cpus
    assert core.cpu_features()["available_cpus"] == available_cpus()
    assert 1 <= core.get_num_threads() <= available_cpus()


@pytest.mark.parametrize("isa", core.compiled_isas())
def test_every_isa_table_covers_every_weight_type(isa: str) -> None:
    """Each compiled ISA's table (csrc/cpu/isa/table_<isa>.cc) has a decode and a prefill kernel
    for every type pyllm.formats.arch accepts as a weight, and nothing for types it does not
    accept."""
    table = core.kernel_table(isa)
    assert set(table) == {int(t) for t in weight_types()}
    for type_id, slots in table.items():
        assert {"matvec", "matmat"} <= set(slots), (isa, type_id, slots)
        # a rows16 kernel only where the rows16 layout exists (else the repack would be wasted)
        if "matvec_r16" in slots or "matmat_r16" in slots:
            assert int(type_id) in {int(t) for t in REPACK_TYPES}, (isa, type_id, slots)


def test_rows16_kernels_where_documented() -> None:
    """The AVX-512 table has rows16 decode and prefill kernels for every repackable type; the
    portable and AVX2 tables have none (their rows16 weights are unpacked for the GGUF kernels)."""
    for isa in core.compiled_isas():
        r16 = {t for t, slots in core.kernel_table(isa).items() if "matvec_r16" in slots}
        r16_mm = {t for t, slots in core.kernel_table(isa).items() if "matmat_r16" in slots}
        expected = {int(t) for t in REPACK_TYPES} if isa == "avx512" else set()
        assert r16 == expected and r16_mm == expected, isa


def test_kernel_table_of_an_isa_not_built_is_refused() -> None:
    absent = [i for i in ("avx2", "avx512", "neon") if i not in core.compiled_isas()]
    for isa in absent:
        with pytest.raises(ValueError, match="not in this build"):
            core.kernel_table(isa)
    with pytest.raises(ValueError, match="unknown ISA"):
        core.kernel_table("sse9")


@pytest.mark.model
def test_the_cli_runs_each_isa_of_this_machine(smollm2_path: object) -> None:
    """`pyllm run` (the installed command: in CI's wheel stage, the wheel's) with each ISA this
    CPU has forced: the run reports that ISA's kernels and writes the same greedy text (the
    kernels agree to float rounding; this prompt has no near-tie in its first 24 tokens)."""
    texts = {}
    for isa in ["scalar", *[i for i in ("avx2", "avx512", "neon") if i in core.available_isas()]]:
        env = {**os.environ, "PYLLM_FORCE_ISA": isa}
        proc = subprocess.run(["pyllm", "run", "-m", str(smollm2_path), "-p",
                               "The three primary colors are", "-n", "24", "--temp", "0",
                               "-c", "256", "--verbose"], capture_output=True, text=True,
                              env=env, cwd=tempfile.gettempdir(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"threads, {isa} kernels" in proc.stderr
        texts[isa] = proc.stdout
    assert len(set(texts.values())) == 1, texts
    assert "red" in texts["scalar"]
