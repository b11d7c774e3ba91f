"""The typed surface and the generated reference pages (issue #23).

- ``pyllm/_core.pyi`` names exactly what the compiled extension has (module names, and each
  class's methods, properties and attributes), and type checkers see it and the package's
  annotations (``py.typed``): mypy on a snippet finds the return types.
- The CLI reference and the endpoint reference that docs/hooks.py generates cover every
  subcommand, option and route of the real parser and app.

The site itself is built by CI (``mkdocs build --strict``), not here.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import site
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import pyllm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(pyllm.__file__).resolve().parent  # the imported pyllm (a source tree or a wheel's)


def _hooks() -> ModuleType:
    """docs/hooks.py as a module (it is a file MkDocs loads, not part of the package)."""
    spec = importlib.util.spec_from_file_location("pyllm_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- pyllm/_core.pyi against the compiled module -------------------------------------------


def stub_names(source: str) -> dict[str, set[str]]:
    """Public names of a stub: "" -> the module's, each class -> its members."""
    tree = ast.parse(source)
    out: dict[str, set[str]] = {"": set()}

    def names(body: list[ast.stmt]) -> set[str]:
        found = set()
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                found.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                found.add(node.target.id)
            elif isinstance(node, ast.Assign):
                found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        return {n for n in found if not n.startswith("_") or n == "__version__"}

    out[""] = names(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = names(node.body)
    return out


def module_names(module: ModuleType) -> dict[str, set[str]]:
    """The same for a live module: its public names, and each class's own public members."""
    out = {"": {n for n in vars(module) if not n.startswith("_") or n == "__version__"}}
    for name, value in vars(module).items():
        if isinstance(value, type) and not name.startswith("_"):
            out[name] = {n for n in vars(value) if not n.startswith("_")}
    return out


def mismatches(stub: dict[str, set[str]], live: dict[str, set[str]]) -> list[str]:
    """What one side has and the other lacks, as readable lines."""
    lines = []
    for scope in sorted(set(stub) | set(live)):
        where = f"{scope}." if scope else ""
        lines += [f"not in the stub: {where}{n}"
                  for n in sorted(live.get(scope, set()) - stub.get(scope, set()))]
        lines += [f"not in the module: {where}{n}"
                  for n in sorted(stub.get(scope, set()) - live.get(scope, set()))]
    return lines


def test_core_stub_matches_the_compiled_module() -> None:
    core = pytest.importorskip("pyllm._core")
    stub = stub_names((PACKAGE / "_core.pyi").read_text(encoding="utf-8"))
    live = module_names(core)
    assert mismatches(stub, live) == []
    # every class has its members listed (a class with nothing compared proves nothing)
    assert {"Context", "Model", "Sampler", "SamplerParams", "HParams", "LoraAdapter", "KVType",
            "RopeScaling"} <= set(live)
    assert all(live[c] for c in live if c)
    assert {"decode", "decode_batch", "save_state", "n_ctx"} <= stub["Context"]


def test_stub_comparison_detects_a_missing_or_extra_name() -> None:
    """Negative control: the comparison above is not vacuous."""
    core = pytest.importorskip("pyllm._core")
    stub = stub_names((PACKAGE / "_core.pyi").read_text(encoding="utf-8"))
    live = module_names(core)
    stub_missing = {k: set(v) for k, v in stub.items()}
    stub_missing[""].discard("quantize")
    stub_missing["Context"].discard("decode_batch")
    assert mismatches(stub_missing, live) == ["not in the stub: quantize",
                                              "not in the stub: Context.decode_batch"]
    extra = {k: set(v) for k, v in stub.items()}
    extra["Sampler"].add("sample_all")
    assert mismatches(extra, live) == ["not in the module: Sampler.sample_all"]


def test_the_typing_files_ship_with_the_package() -> None:
    # next to the imported package: in CI's wheel stage, that is the installed wheel
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_mypy_sees_the_public_types(tmp_path: Path) -> None:
    """mypy takes its types from the package (py.typed) and the stub: a wrong assignment from
    each is an error naming the real type, and the same snippet with correct types passes."""
    pytest.importorskip("mypy")
    good = tmp_path / "good.py"
    bad = tmp_path / "bad.py"
    common = ("import numpy as np\n"
              "import pyllm\n"
              "from pyllm import _core\n"
              "from pyllm.formats.gguf import GGUFReader\n\n\n"
              "def use(llm: pyllm.LLM, reader: GGUFReader) -> None:\n")
    good.write_text(common +
                    "    n: int = _core.matmat_min_tokens()\n"
                    "    q: np.ndarray = _core.quantize(8, np.zeros(32, np.float32))\n"
                    "    text: str = llm.generate('Once', max_tokens=4)\n"
                    "    params: pyllm.SamplingParams = pyllm.SamplingParams(temperature=0)\n"
                    "    print(n, q, text, params, reader.metadata)\n", encoding="utf-8")
    bad.write_text(common +
                   "    n: str = _core.matmat_min_tokens()\n"
                   "    text: int = llm.generate('Once', max_tokens=4)\n"
                   "    print(n, text)\n", encoding="utf-8")
    env = dict(os.environ)
    installed = any(PACKAGE.parent == Path(p).resolve() for p in site.getsitepackages())
    if not installed:  # a source tree (editable install): mypy reads it from MYPYPATH
        env["MYPYPATH"] = str(PACKAGE.parent)

    def mypy(path: Path) -> subprocess.CompletedProcess[str]:
        # errors of pyllm's own modules are not this test's subject: only the snippet's count
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary",
             "--cache-dir", str(tmp_path / "cache"), str(path)],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    ok = mypy(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = mypy(bad)
    errors = [line for line in wrong.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, wrong.stdout + wrong.stderr
    assert 'expression has type "int", variable has type "str"' in errors[0]
    assert 'expression has type "str", variable has type "int"' in errors[1]


# ---- the generated CLI reference -------------------------------------------------------------


def test_cli_reference_covers_every_subcommand_and_option() -> None:
    from pyllm.cli import build_parser

    hooks = _hooks()
    parser = build_parser()
    markdown = hooks.cli_reference(parser)
    assert hooks.cli_reference_gaps(parser, markdown) == []
    subs = hooks.subcommands(parser)
    # every parser the subparsers action holds (aliases included) is one of those documented
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {id(p) for p in sub_action.choices.values()} == {id(p) for p in subs.values()}
    assert {"run", "chat", "serve", "quantize", "convert", "perplexity"} <= set(subs)
    for name, sub in subs.items():
        assert f"\n## pyllm {name}\n" in markdown
        for action in sub._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}" in markdown, (name, flag)
    run_section = markdown.split("\n## pyllm run\n")[1].split("\n## ")[0]
    assert "| `-n N`, `--n-predict N` | tokens to generate" in run_section
    assert "| `128` |" in run_section  # the default


def test_cli_reference_gaps_finds_what_is_missing() -> None:
    """Negative controls: a deleted row, and an option the reference predates."""
    from pyllm.cli import build_parser

    hooks = _hooks()
    parser = build_parser()
    markdown = hooks.cli_reference(parser)
    without = "\n".join(line for line in markdown.splitlines()
                        if not line.startswith("| `-n N`, `--n-predict N`"))
    gaps = hooks.cli_reference_gaps(parser, without)
    assert "pyllm run: -n" in gaps and "pyllm run: --n-predict" in gaps
    hooks.subcommands(parser)["quantize"].add_argument("--pure", action="store_true",
                                                      help="one type for every tensor")
    assert hooks.cli_reference_gaps(parser, markdown) == ["pyllm quantize: --pure",
                                                           "pyllm quantize: help of pure"]
    assert hooks.cli_reference_gaps(parser, hooks.cli_reference(parser)) == []


# ---- the generated endpoint reference --------------------------------------------------------


def test_endpoint_reference_covers_every_route() -> None:
    pytest.importorskip("fastapi")
    hooks = _hooks()
    routes = hooks.app_routes()
    assert hooks.endpoint_gaps(routes) == []
    markdown = hooks.endpoints_reference(routes)
    paths = {(m, r.path) for r in routes for m in r.methods}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
            ("GET", "/health"), ("POST", "/v1/embeddings")} <= paths
    for method, path in paths:
        assert f"\n## {method} {path}\n" in markdown
    from pyllm.server.schemas import ChatCompletionRequest

    chat = markdown.split("\n## POST /v1/chat/completions\n")[1].split("\n## ")[0]
    assert "Request body (JSON): `ChatCompletionRequest`" in chat
    for name, field in ChatCompletionRequest.model_fields.items():
        assert f"| `{field.alias or name}` |" in chat, name


def test_endpoint_gaps_finds_an_undocumented_handler() -> None:
    pytest.importorskip("fastapi")
    hooks = _hooks()

    class Route:
        methods = {"GET"}
        path = "/new"

        @staticmethod
        def endpoint() -> Any:
            return None

    assert hooks.endpoint_gaps([Route()]) == ["GET /new: the handler has no docstring"]
