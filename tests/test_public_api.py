"""The top-level API (``import pyllm; pyllm.LLM(...)``), what ``import pyllm`` loads, and the
message when the compiled extension is missing (a source checkout that was never built)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import pyllm
import pyllm.errors
import pyllm.formats.gguf
import pyllm.runtime.devices
import pyllm.runtime.grammar
import pyllm.runtime.llm
import pyllm.runtime.loaded
import pyllm.runtime.mpi
import pyllm.runtime.sampling
import pyllm.runtime.speculative
import pyllm.tokenizer

PUBLIC = {
    "LLM": pyllm.runtime.llm.LLM,
    "LLMState": pyllm.runtime.llm.LLMState,
    "LoadedModel": pyllm.runtime.loaded.LoadedModel,
    "Pipeline": pyllm.runtime.mpi.Pipeline,
    "SamplingParams": pyllm.runtime.sampling.SamplingParams,
    "Tokenizer": pyllm.tokenizer.Tokenizer,
    "GGUFReader": pyllm.formats.gguf.GGUFReader,
    "GGUFWriter": pyllm.formats.gguf.GGUFWriter,
    "devices": pyllm.runtime.devices.devices,
    "DeviceInfo": pyllm.runtime.devices.DeviceInfo,
    "Grammar": pyllm.runtime.grammar.Grammar,
    "NgramDrafter": pyllm.runtime.speculative.NgramDrafter,
    "DraftModel": pyllm.runtime.speculative.DraftModel,
    **{name: getattr(pyllm.errors, name) for name in pyllm.errors.__all__},
}


def _python(code: str, cwd: Path, *args: str, isolated_path: list[str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` (or ``python -m ...`` when code is empty) in ``cwd``.

    With ``isolated_path``, ``-S`` skips the site hooks (an editable install's import redirect
    among them) and PYTHONPATH is exactly that list, so the pyllm found is the one in ``cwd``.
    """
    cmd = [sys.executable, *(("-S",) if isolated_path is not None else ()),
           *(("-c", code) if code else ()), *args]
    env = dict(os.environ)  # the same pyllm as this process, unless isolated_path says
    if isolated_path is not None:
        env["PYTHONPATH"] = ":".join(isolated_path)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_public_names_at_the_top_level() -> None:
    for name, obj in PUBLIC.items():
        assert getattr(pyllm, name) is obj, name
        assert name in pyllm.__all__ and name in dir(pyllm), name
    assert set(pyllm.__all__) == {"__version__", *PUBLIC}
    assert "__version__" in dir(pyllm) and pyllm.__version__[0].isdigit()
    from pyllm import LLM, SamplingParams  # the from-import form goes through __getattr__ too

    assert LLM is pyllm.runtime.llm.LLM and SamplingParams is pyllm.runtime.sampling.SamplingParams
    with pytest.raises(AttributeError, match="no attribute 'Llama'"):
        pyllm.Llama  # noqa: B018 - the lookup is the test


def test_import_pyllm_loads_neither_the_extension_nor_numpy() -> None:
    code = ("import sys, json, pyllm; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('pyllm', 'numpy')))))")
    proc = _python(code, Path(tempfile.gettempdir()))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["pyllm", "pyllm.errors"]
    # negative control: the lazy names do load their modules when used
    # (and a submodule is still an attribute of the package, as pyllm.tokenizer was when
    # `import pyllm` imported it)
    # (the LLM's modules need no numpy until an array is asked for: a cold `pyllm run` does
    # without; the writer does need it)
    proc = _python("import sys, pyllm; pyllm.LLM; print('pyllm.runtime.llm' in sys.modules, "
                   "'numpy' in sys.modules, pyllm.tokenizer.Tokenizer is pyllm.Tokenizer); "
                   "pyllm.GGUFWriter; print('numpy' in sys.modules)",
                   Path(tempfile.gettempdir()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "True", "True"]


@pytest.fixture(scope="module")
def unbuilt_checkout() -> tuple[Path, list[str]]:
    """A copy of the pure-Python pyllm tree (no compiled files), as in a fresh source checkout,
    and a sys.path on which it comes first and the installed packages (numpy...) follow."""
    root = Path(tempfile.mkdtemp(prefix="pyllm-unbuilt-"))
    shutil.copytree(Path(pyllm.__file__).parent, root / "pyllm",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.dylib", "__pycache__"))
    path = [str(root), *site.getsitepackages()]
    yield root, path
    shutil.rmtree(root, ignore_errors=True)


def _assert_missing_core_message(line: str, root: Path) -> None:
    assert "the compiled extension pyllm._core is missing" in line, line
    assert str(root / "pyllm") in line, line  # where the extension-less pyllm came from
    assert "source checkout that was never built" in line, line
    assert "shadows the installed pyllm" in line, line
    assert "`pip install .`" in line and "pip install --no-build-isolation -e" in line, line
    assert "run from another folder" in line, line


def test_missing_extension_python_api(unbuilt_checkout: tuple[Path, list[str]],
                                      smollm2_path: Path) -> None:
    root, path = unbuilt_checkout
    code = ("import sys, pyllm\n"
            "assert pyllm.__file__.startswith(sys.argv[2]), pyllm.__file__\n"
            "from pyllm.runtime.sampling import Sampler\n"
            "for make in (lambda: pyllm.LLM(sys.argv[1]),\n"
            "             lambda: Sampler(pyllm.SamplingParams(), 10)):\n"
            "    try:\n"
            "        make()\n"
            "    except pyllm.PyllmError as e:\n"
            "        print(type(e).__name__, e)\n")
    proc = _python(code, root, str(smollm2_path), str(root), isolated_path=path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["ModelError", "SamplingError"], proc.stdout
    for line in lines:
        _assert_missing_core_message(line, root)


def test_missing_extension_cli_says_so_in_one_line(unbuilt_checkout: tuple[Path, list[str]],
                                                   smollm2_path: Path) -> None:
    root, path = unbuilt_checkout
    proc = _python("", root, "-m", "pyllm", "run", "-m", str(smollm2_path), "-p", "hi",
                   isolated_path=path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    _assert_missing_core_message(lines[0], root)
