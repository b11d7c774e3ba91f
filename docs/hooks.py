"""MkDocs hooks: the parts of the documentation that are generated from the code.

- ``<!-- generated: cli -->`` in a page becomes the CLI reference, built from the real argparse
  parser (``pyllm.cli.build_parser``): every subcommand, every option with its help, default and
  choices. A new flag appears in the docs without anyone editing them.
- ``<!-- generated: endpoints -->`` becomes the HTTP reference, built from the route table of the
  FastAPI app ``pyllm.server.app.create_app`` returns. The app is made with a loader that is
  never called (its lifespan never starts), so no model is loaded and nothing touches the
  network. Request bodies are read by the handlers themselves (for OpenAI-shaped errors), so
  FastAPI does not know them; each handler's body model is found in its source and its fields
  are listed from the pydantic model.
- Every object a page renders with ``::: name`` must have a complete Google-style docstring
  (every parameter under ``Args:``, a ``Returns:``/``Yields:`` section when something is
  returned). griffe itself only warns about documented parameters that do not exist, so this
  check adds the other direction; its findings are MkDocs warnings, which ``--strict`` turns into
  a failed build.

tests/test_api_docs.py imports this file and tests the generators directly.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the checkout being documented, not whichever pyllm happens to be installed
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("mkdocs.plugins.pyllm")

CLI_MARKER = "<!-- generated: cli -->"
ENDPOINTS_MARKER = "<!-- generated: endpoints -->"
# `::: dotted.name` lines of mkdocstrings
_OBJECT_LINE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)
# usage lines wrap at the terminal width; a fixed width keeps the generated pages reproducible
_USAGE_WIDTH = 100


# ---- the CLI reference --------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text that is safe inside one Markdown table cell: a pipe outside a code span is escaped
    (inside one, the tables extension leaves it alone and an escape would show)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=_USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    # %(default)s and friends, expanded exactly as --help expands them
    formatter = argparse.HelpFormatter(parser.prog, width=_USAGE_WIDTH)
    return formatter._expand_help(action)


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:  # a positional argument
        return f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    formatter = argparse.HelpFormatter("pyllm")
    value = formatter._format_args(action, action.dest.upper())
    return ", ".join(f"`{s} {value}`" for s in action.option_strings)


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0:
        return ""  # no value, or a flag whose default is just "not given"
    if isinstance(default, list | tuple) and not default:
        return ""
    return f"`{default}`"


def _documented_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.help is argparse.SUPPRESS:
            continue
        yield action


def _argument_tables(parser: argparse.ArgumentParser) -> list[str]:
    """One table per argument group, in the order --help shows them."""
    exclusive = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    out: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a in list(_documented_actions(parser))]
        if not actions:
            continue
        out += [f"**{group.title}**", "", "| argument | description | default |",
                "| --- | --- | --- |"]
        for action in actions:
            notes = []
            if action.choices is not None and not isinstance(action.choices, dict):
                notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
            if action.required and action.option_strings:
                notes.append("required")
            if id(action) in exclusive:
                others = [_flags(a) for a in exclusive[id(action)]._group_actions
                          if a is not action]
                notes.append("not with " + ", ".join(others))
            text = _help(parser, action)
            if notes:
                text = f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)
            out.append(f"| {_cell(_flags(action))} | {_cell(text)} | {_cell(_default(action))} |")
        out.append("")
    return out


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of a parser, by name, in the order they were added.

    Args:
        parser: A parser made with ``add_subparsers``.

    Returns:
        Each subcommand's name and its parser (aliases left out).
    """
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                found[choice.dest] = action.choices[choice.dest]
    return found


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {choice.dest: choice.help or ""
            for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for choice in action._choices_actions}


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """The Markdown CLI reference of a parser and its subcommands.

    Args:
        parser: The top-level parser (``pyllm.cli.build_parser()`` for the docs).

    Returns:
        Markdown: the global options, then one section per subcommand with its usage, its
        description and a table per argument group.
    """
    lines = [f"Usage: `{parser.prog} COMMAND [options]`", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += _argument_tables(parser)
    helps = _subcommand_help(parser)
    lines += ["| command | what it does |", "| --- | --- |"]
    lines += [f"| [`{name}`](#{_anchor(parser.prog, name)}) | {_cell(helps[name])} |"
              for name in subcommands(parser)]
    lines.append("")
    for name, sub in subcommands(parser).items():
        lines += [f"## {parser.prog} {name}", "", "```text", _usage(sub), "```", ""]
        if sub.description:
            lines += [sub.description, ""]
        lines += _argument_tables(sub)
    return "\n".join(lines)


def _anchor(prog: str, name: str) -> str:
    # MkDocs' default slug (markdown's toc extension) of the "## prog name" headings
    return re.sub(r"[^\w\- ]", "", f"{prog} {name}").strip().lower().replace(" ", "-")


def cli_reference_gaps(parser: argparse.ArgumentParser, markdown: str) -> list[str]:
    """What of a parser a CLI reference leaves out (tests and the build check with it).

    Args:
        parser: The top-level parser.
        markdown: A reference generated from it (or edited since).

    Returns:
        One entry per missing subcommand section, option string or help text; empty when the
        reference covers them all.
    """
    gaps = []
    sections = dict(_sections(markdown))
    for name, sub in {"": parser, **subcommands(parser)}.items():
        title = f"{parser.prog} {name}".strip()
        text = sections.get(title) if name else sections.get("")
        if text is None:
            gaps.append(f"{title}: no section")
            continue
        for action in _documented_actions(sub):
            for flag in action.option_strings or [action.metavar or action.dest]:
                if f"`{flag}`" not in text and f"`{flag} " not in text:
                    gaps.append(f"{title}: {flag}")
            if action.help and _cell(_help(sub, action)) not in text:
                gaps.append(f"{title}: help of {action.dest}")
    return gaps


def _sections(markdown: str) -> Iterator[tuple[str, str]]:
    """(heading, body) of each ``## `` section; the text before the first has heading ""."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    yield "", parts[0]
    for i in range(1, len(parts), 2):
        yield parts[i].strip(), parts[i + 1]


# ---- the HTTP endpoints -------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A field's type as written in the source, without module prefixes."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", str(annotation))


def _constraints(field: Any) -> str:
    words = {"ge": ">=", "le": "<=", "gt": ">", "lt": "<", "min_length": "min length",
             "max_length": "max length"}
    out = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return ", ".join(out)


def model_fields_table(model: Any) -> list[str]:
    """A Markdown table of a pydantic model's fields as a request body spells them.

    Args:
        model: A pydantic ``BaseModel`` class.

    Returns:
        The table's lines: field name (its alias where it has one), type, default, limits.
    """
    from pydantic_core import PydanticUndefined

    rows = ["| field | type | default | limits |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        shown = field.alias or name
        default = "required" if field.default is PydanticUndefined and \
            field.default_factory is None else f"`{field.get_default(call_default_factory=True)!r}`"
        rows.append(f"| `{shown}` | {_cell('`' + _type_name(field.annotation) + '`')} | "
                    f"{_cell(default)} | {_cell(_constraints(field))} |")
    return rows


def _body_model(endpoint: Any, namespace: dict[str, Any]) -> Any:
    """The pydantic model a handler parses its body into (``_body(request, M)`` or
    ``_parse(M, ...)`` in its source), or None."""
    source = inspect.getsource(endpoint)
    match = re.search(r"_body\(request, (\w+)\)|_parse\((\w+),", source)
    return namespace[match.group(1) or match.group(2)] if match else None


def app_routes() -> list[Any]:
    """The API routes of the server's FastAPI app, in the order they were added.

    The app is built without a model: its loader would only run when the app starts serving.

    Returns:
        FastAPI ``APIRoute`` objects (path, methods, endpoint).
    """
    from fastapi.routing import APIRoute

    from pyllm.server.app import ServerConfig, create_app

    def never_loaded() -> Any:
        raise AssertionError("the docs build never starts the app")

    guard: Any = create_app(ServerConfig(), loader=never_loaded)
    fastapi_app = guard.app  # no CORS middleware in between: the default config has no origins
    return [r for r in fastapi_app.routes if isinstance(r, APIRoute)]


def endpoints_reference(routes: list[Any]) -> str:
    """The Markdown reference of the server's HTTP endpoints.

    Args:
        routes: FastAPI ``APIRoute`` objects (:func:`app_routes`).

    Returns:
        Markdown: a summary table, then per endpoint its method and path, the handler's
        description, its path parameters and its request body's fields.
    """
    import pyllm.server.app as app_module

    namespace = vars(app_module)
    summary = ["| method | path | summary |", "| --- | --- | --- |"]
    sections: list[str] = []
    for route in routes:
        for method in sorted(route.methods):
            doc = inspect.getdoc(route.endpoint) or ""
            first = doc.split("\n\n")[0]
            anchor = _route_anchor(method, route.path)
            summary.append(f"| `{method}` | [`{route.path}`](#{anchor}) | {_cell(first)} |")
            sections += [f"## {method} {route.path}", "", textwrap.dedent(doc), ""]
            params = [p.name for p in route.dependant.path_params]
            if params:
                sections += ["Path parameters: " + ", ".join(f"`{p}`" for p in params), ""]
            model = _body_model(route.endpoint, namespace)
            if model is not None:
                sections += [f"Request body (JSON): `{model.__name__}`", ""]
                sections += model_fields_table(model)
                sections.append("")
    return "\n".join(summary + [""] + sections)


def endpoint_gaps(routes: list[Any]) -> list[str]:
    """Routes the endpoint reference could not describe.

    Args:
        routes: FastAPI ``APIRoute`` objects (:func:`app_routes`).

    Returns:
        One entry per route whose handler has no docstring; empty when every route has one.
    """
    return [f"{sorted(r.methods)[0]} {r.path}: the handler has no docstring" for r in routes
            if not inspect.getdoc(r.endpoint)]


def _route_anchor(method: str, path: str) -> str:
    return re.sub(r"[^\w\- ]", "", f"{method} {path}").strip().lower().replace(" ", "-")


# ---- docstring completeness ---------------------------------------------------------------


def documented_objects(docs_dir: Path) -> list[str]:
    """Every object a page renders with mkdocstrings.

    Args:
        docs_dir: The MkDocs ``docs_dir``.

    Returns:
        The dotted names of the ``::: name`` lines of every page, in file order.
    """
    names = []
    for page in sorted(docs_dir.rglob("*.md")):
        names += _OBJECT_LINE.findall(page.read_text(encoding="utf-8"))
    return names


def docstring_gaps(names: list[str]) -> list[str]:
    """What the docstrings of the given objects (and their public members) leave out.

    A function or method needs a docstring, an annotation on every parameter and its return,
    every parameter under ``Args:`` (a class documents its ``__init__`` parameters in its own
    docstring, as ``merge_init_into_class`` shows them) and a ``Returns:`` or ``Yields:``
    section unless it returns None. A property needs a docstring. Read statically by griffe, as
    mkdocstrings does.

    Args:
        names: Dotted names of modules, classes or functions.

    Returns:
        One line per gap, naming the object and what is missing.
    """
    import griffe

    loader = griffe.GriffeLoader(docstring_parser=griffe.Parser.google, allow_inspection=False,
                                 search_paths=[str(ROOT)])
    loader.load("pyllm")
    loader.resolve_aliases(implicit=False, external=False)
    gaps: list[str] = []
    for name in names:
        gaps += _object_gaps(loader.modules_collection[name], top=True)
    return gaps


def _public(obj: Any) -> bool:
    return not obj.name.startswith("_") and not obj.is_alias


def _object_gaps(obj: Any, top: bool = False) -> list[str]:
    if obj.is_alias:
        obj = obj.final_target
    if obj.is_module:
        exported = getattr(obj, "exports", None)
        members = [m for n, m in obj.members.items()
                   if (n in exported if exported is not None else _public(m))
                   and not m.is_module and (m.is_class or m.is_function)]
        return [g for m in members for g in _object_gaps(m)]
    if obj.is_class:
        gaps = [] if obj.docstring else [f"{obj.path}: no docstring"]
        init = obj.members.get("__init__")
        if init is not None and not init.is_alias and init.is_function and obj.docstring:
            documented = _param_names(_parse(obj.docstring))
            if not _is_dataclass(obj):
                gaps += [f"{obj.path}: parameter {p} not under Args"
                         for p in _params(init) if p not in documented]
            gaps += _annotation_gaps(init, f"{obj.path}.__init__", returns=False)
        for member in obj.members.values():
            if _public(member) and (member.is_function or member.is_class):
                gaps += _object_gaps(member)
        return gaps
    if obj.is_function:
        return _function_gaps(obj)
    return []


def _parse(docstring: Any) -> list[Any]:
    import griffe

    return docstring.parse(griffe.Parser.google)


def _is_dataclass(cls: Any) -> bool:
    # a dataclass documents its fields as attributes (with their own docstrings or comments)
    return any(str(d.value).split("(")[0].endswith("dataclass") for d in cls.decorators)


def _params(fn: Any) -> list[str]:
    return [p.name for p in fn.parameters if p.name not in ("self", "cls")]


def _param_names(sections: list[Any]) -> set[str]:
    return {p.name.lstrip("*") for s in sections
            if s.kind.value in ("parameters", "other parameters") for p in s.value}


def _annotation_gaps(fn: Any, path: str, returns: bool = True) -> list[str]:
    gaps = [f"{path}: parameter {p.name} has no annotation" for p in fn.parameters
            if p.name not in ("self", "cls") and p.annotation is None]
    if returns and fn.returns is None:
        gaps.append(f"{path}: no return annotation")
    return gaps


def _function_gaps(fn: Any) -> list[str]:
    if not fn.docstring:
        return [f"{fn.path}: no docstring"]
    if "property" in fn.labels:
        return []
    sections = _parse(fn.docstring)
    kinds = {s.kind.value for s in sections}
    documented = _param_names(sections)
    gaps = [f"{fn.path}: parameter {p} not under Args" for p in _params(fn)
            if p not in documented]
    gaps += _annotation_gaps(fn, fn.path)
    if fn.returns is not None and str(fn.returns) not in ("None", "NoReturn") \
            and not kinds & {"returns", "yields"}:
        gaps.append(f"{fn.path}: no Returns section")
    return gaps


# ---- MkDocs events --------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    """Check the docstrings of every object the pages render (warnings fail --strict).

    Args:
        config: The MkDocs configuration.

    Returns:
        The configuration, unchanged.
    """
    for gap in docstring_gaps(documented_objects(Path(config["docs_dir"]))):
        log.warning("incomplete docstring: %s", gap)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Put the generated references where a page has their markers.

    Args:
        markdown: The page's Markdown.
        page: The MkDocs page.
        config: The MkDocs configuration.
        files: The site's files.

    Returns:
        The Markdown with the markers replaced.
    """
    if CLI_MARKER in markdown:
        from pyllm.cli import build_parser

        parser = build_parser()
        reference = cli_reference(parser)
        for gap in cli_reference_gaps(parser, reference):
            log.warning("CLI reference: %s", gap)
        markdown = markdown.replace(CLI_MARKER, reference)
    if ENDPOINTS_MARKER in markdown:
        routes = app_routes()
        for gap in endpoint_gaps(routes):
            log.warning("endpoint reference: %s", gap)
        markdown = markdown.replace(ENDPOINTS_MARKER, endpoints_reference(routes))
    return markdown

