"""Reading tool calls out of model text: the pieces every syntax shares, and the stream parsers.

:mod:`pyllm.chat.tools` owns the syntaxes (prompts, grammars, whole-reply ``parse``); this module
owns what reads model output: :class:`ToolCall`, the stream deltas, the leaf readers (one call
object, a list of them, a JSON string read as it streams) and one :class:`ToolStreamParser` per
syntax. The leaf readers are shared with the whole-reply parsers; the way a reply is cut into
content and call sections is written twice on purpose (once over the whole text, once as a state
machine over pieces), so the tests that compare the two catch a slip in either.

Rules both sides follow:

- Content is every piece of text that is not a recognised call, joined, with trailing whitespace
  removed (``None`` when nothing is left). A stream holds back trailing whitespace until more
  content follows, so both give the same text.
- A call section that does not parse is content, marker included; model output never raises.
- Each call is emitted whole: one :class:`CallDelta` with index, id, name and all its arguments,
  as soon as the call is known to be valid (Hermes: when its ``</tool_call>`` arrives; Llama 3,
  Mistral and generic JSON: at :meth:`ToolStreamParser.finish`, because text after a call can
  still turn the section into content). A generic ``{"response": "..."}`` reply streams its
  text as it comes.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyllm.errors import ToolCallError

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MISTRAL_ID_RE = re.compile(r"[a-zA-Z0-9]{9}")
_ALNUM = string.ascii_letters + string.digits
JSON_WS = " \t\n\r"

# Markers of the syntaxes, as text (the control tokens' text for Llama 3 and Mistral).
PYTHON_TAG = "<|python_tag|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_CALLS = "[TOOL_CALLS]"


def new_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def new_mistral_id() -> str:
    """A random id in Mistral's shape (9 letters and digits)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def mistral_id(call_id: str) -> str:
    """``call_id`` when it is already Mistral-shaped, else 9 letters and digits derived from it
    (the same input always gives the same id, so a call and its result stay paired)."""
    if MISTRAL_ID_RE.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest(), "big")
    out = []
    for _ in range(9):
        n, r = divmod(n, len(_ALNUM))
        out.append(_ALNUM[r])
    return "".join(out)


@dataclass(frozen=True)
class ToolCall:
    """One function call of the model. ``arguments`` is JSON text (compact), as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` item (with ``index`` when given, as stream deltas have)."""
        out: dict[str, Any] = {} if index is None else {"index": index}
        out.update(id=self.id, type="function",
                   function={"name": self.name, "arguments": self.arguments})
        return out


@dataclass(frozen=True)
class ContentDelta:
    """Text of the reply's content."""

    text: str


@dataclass(frozen=True)
class CallDelta:
    """A piece of call ``index``: the first has its id and name, later ones (if any) only more
    argument text. The parsers here emit each call whole, in one delta."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The ``delta.tool_calls`` item of an OpenAI chat completion chunk."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            out.update(id=self.id, type="function")
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments
        out["function"] = function
        return out


Delta = ContentDelta | CallDelta

# ---- leaf readers -------------------------------------------------------------------------------

# (name, arguments as compact JSON text, the id the model wrote or None)
Parsed = tuple[str, str, str | None]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity); ValueError otherwise."""
    return _DECODER.decode(text)


def compact(obj: Any) -> str:
    """Compact JSON text of ``obj``, non-ASCII kept (escaped only where it cannot be UTF-8)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        text = json.dumps(obj, separators=(",", ":"))
    return text


def read_call(obj: Any, arg_keys: Sequence[str] = ("arguments", "parameters")) -> Parsed | None:
    """A call object ``{"name": ..., "arguments": {...}}`` (``arg_keys`` in order of preference;
    arguments may also be JSON text of an object), or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None
    key = next((k for k in arg_keys if k in obj), None)
    if key is None:
        return None
    args = obj[key]
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    call_id = obj.get("id")
    return name, compact(args), call_id if isinstance(call_id, str) else None


class Opening:
    """Whether text starts with a JSON opening such as ``{ "name" :`` (whitespace between the
    parts allowed): YES (and where it ends), MAYBE (the text is a prefix of one) or NO."""

    YES, MAYBE, NO = "yes", "maybe", "no"


def match_opening(text: str, parts: Sequence[str]) -> tuple[str, int]:
    i, n = 0, len(text)
    for k, part in enumerate(parts):
        if k:
            while i < n and text[i] in JSON_WS:
                i += 1
        if i >= n:
            return Opening.MAYBE, i
        seg = text[i:i + len(part)]
        if seg != part[:len(seg)]:
            return Opening.NO, i
        if len(seg) < len(part):
            return Opening.MAYBE, n
        i += len(part)
    return Opening.YES, i


CALL_OPENING = ("{", '"name"', ":")
RESPONSE_OPENING = ("{", '"response"', ":", '"')
TOOL_CALLS_OPENING = ("{", '"tool_calls"', ":")


def llama_calls(section: str) -> list[Parsed] | None:
    """One or more Llama 3 call objects separated by ``;`` filling ``section`` (whitespace
    around them allowed). Each must open with its ``"name"`` key, as Llama writes them."""
    out: list[Parsed] = []
    pos, n = 0, len(section)
    while True:
        while pos < n and section[pos] in JSON_WS:
            pos += 1
        if match_opening(section[pos:], CALL_OPENING)[0] != Opening.YES:
            return None
        try:
            obj, pos = _DECODER.raw_decode(section, pos)
        except ValueError:
            return None
        call = read_call(obj, ("parameters", "arguments"))
        if call is None:
            return None
        out.append(call)
        rest = section[pos:].lstrip(JSON_WS)
        if not rest.strip():
            return out
        if rest[0] != ";":
            return None
        pos = n - len(rest) + 1


def hermes_block(inner: str) -> Parsed | None:
    """The JSON object between ``<tool_call>`` and ``</tool_call>``."""
    try:
        obj = loads(inner.strip())
    except ValueError:
        return None
    return read_call(obj)


def mistral_calls(section: str) -> list[Parsed] | None:
    """What follows ``[TOOL_CALLS]``: a JSON list of call objects (a lone object is taken as a
    list of one), nothing but whitespace after it."""
    try:
        obj = loads(section.strip())
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [read_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def generic_calls(text: str) -> list[Parsed] | None:
    """A whole generic reply ``{"tool_calls": [call, ...]}`` (that key first and alone)."""
    s = text.strip()
    if match_opening(s, TOOL_CALLS_OPENING)[0] != Opening.YES:
        return None
    try:
        obj = loads(s)
    except ValueError:
        return None
    if not isinstance(obj, dict) or list(obj) != ["tool_calls"]:
        return None
    items = obj["tool_calls"]
    if not isinstance(items, list) or not items:
        return None
    calls = [read_call(item) for item in items]
    if any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_PLAIN = re.compile(r'[^"\\]+')


def _hex4(s: str) -> int | None:
    return int(s, 16) if len(s) == 4 and all(c in _HEX for c in s) else None


def decode_string(s: str, final: bool) -> tuple[str, int, bool]:
    """Decode the body of a JSON string (after its opening quote) as far as it goes.

    Returns (text, characters consumed, whether the closing quote was reached). An escape that
    is cut off is left unconsumed unless ``final``; a bad escape is kept as written and a lone
    surrogate becomes U+FFFD (model output is never refused). Decoding in pieces gives the same
    text as decoding at once: every decision looks only at characters already present.
    """
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return "".join(out), i + 1, True
        if c != "\\":
            m = _PLAIN.match(s, i)
            assert m is not None  # s[i] is neither a quote nor a backslash
            out.append(m.group())
            i = m.end()
            continue
        if i + 1 >= n:
            break
        e = s[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
            continue
        if e != "u":
            out.append(s[i:i + 2])
            i += 2
            continue
        if i + 6 > n:
            break
        cp = _hex4(s[i + 2:i + 6])
        if cp is None:
            out.append(s[i:i + 2])
            i += 2
        elif 0xD800 <= cp < 0xDC00:  # a high surrogate: a low one must follow to make a pair
            if i + 12 > n and not final:
                return "".join(out), i, False
            low = _hex4(s[i + 8:i + 12]) if s[i + 6:i + 8] == "\\u" else None
            if low is not None and 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
            else:
                out.append("\ufffd")
                i += 6
        else:
            out.append("\ufffd" if 0xDC00 <= cp < 0xE000 else chr(cp))
            i += 6
    if final and i < n:  # an escape cut off at the very end: kept as written
        out.append(s[i:])
        i = n
    return "".join(out), i, False


def make_calls(parsed: Sequence[Parsed], mistral_ids: bool = False) -> list[ToolCall]:
    """ToolCalls with fresh ids (Mistral: the model's own id when it is Mistral-shaped)."""
    out = []
    for name, args, model_id in parsed:
        if mistral_ids:
            keep = model_id is not None and MISTRAL_ID_RE.fullmatch(model_id)
            call_id = model_id if keep and model_id is not None else new_mistral_id()
        else:
            call_id = new_call_id()
        out.append(ToolCall(call_id, name, args))
    return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


# ---- stream parsers -----------------------------------------------------------------------------

class ToolStreamParser:
    """Turns a reply, fed in pieces, into content and call deltas. Subclasses implement
    :meth:`_advance` over ``self._buf`` (text not yet settled)."""

    # A Mistral-shaped id the model wrote is kept; other syntaxes always get OpenAI-style ids.
    mistral_ids = False

    def __init__(self) -> None:
        self._buf = ""
        self._ws = ""  # trailing whitespace of the content, held until more content follows
        self._out: list[Delta] = []
        self._count = 0
        self._done = False

    def feed(self, text: str) -> list[Delta]:
        """The deltas that ``text`` (the next piece of the reply) settles."""
        if self._done:
            raise ToolCallError("feed() after finish()")
        if not isinstance(text, str):
            raise ToolCallError(f"feed() takes text, not {type(text).__name__}")
        if text:
            self._buf += text
            self._advance(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """The end of the reply: everything still held back is settled."""
        if not self._done:
            self._done = True
            self._advance(final=True)
        return self._take()

    def _advance(self, final: bool) -> None:
        raise NotImplementedError

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        self._out.append(ContentDelta(self._ws + body))
        self._ws = text[len(body):]

    def _calls(self, calls: Sequence[Parsed]) -> None:
        for call in make_calls(calls, self.mistral_ids):
            self._out.append(CallDelta(self._count, call.id, call.name, call.arguments))
            self._count += 1

    def _text_until(self, marker: str, final: bool) -> bool:
        """Content up to ``marker``: True with the buffer starting at the marker when found;
        otherwise the text is content except an end that may be the marker's start."""
        i = self._buf.find(marker)
        if i >= 0:
            self._content(self._buf[:i])
            self._buf = self._buf[i:]
            return True
        keep = 0 if final else partial_suffix(self._buf, marker)
        self._content(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False


class HermesStream(ToolStreamParser):
    """``<tool_call>{...}</tool_call>`` blocks among content; each call as its block closes."""

    def __init__(self) -> None:
        super().__init__()
        self._in_block = False
        self._scanned = 0  # where the search for </tool_call> resumes

    def _advance(self, final: bool) -> None:
        while True:
            if not self._in_block:
                if not self._text_until(TOOL_CALL_OPEN, final):
                    return
                self._in_block, self._scanned = True, len(TOOL_CALL_OPEN)
            start = max(self._scanned, len(TOOL_CALL_OPEN))
            j = self._buf.find(TOOL_CALL_CLOSE, start)
            if j < 0:
                self._scanned = max(start, len(self._buf) - len(TOOL_CALL_CLOSE) + 1)
                if final:  # an unclosed last block is a call only if its JSON is whole
                    call = hermes_block(self._buf[len(TOOL_CALL_OPEN):])
                    if call is None:
                        self._content(self._buf)
                    else:
                        self._calls([call])
                    self._buf = ""
                return
            end = j + len(TOOL_CALL_CLOSE)
            call = hermes_block(self._buf[len(TOOL_CALL_OPEN):j])
            if call is None:
                self._content(self._buf[:end])
            else:
                self._calls([call])
            self._buf = self._buf[end:]
            self._in_block = False


class _MarkerThenSection(ToolStreamParser):
    """Content, then a marker after which everything up to the end is the call section."""

    marker = ""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[str] | None = None  # the section (marker first), once the marker came

    def _section(self, text: str) -> list[Parsed] | None:
        raise NotImplementedError

    def _hold_section(self, final: bool) -> None:
        if self._held is None:
            if not self._text_until(self.marker, final):
                return
            self._held = []
        self._held.append(self._buf)
        self._buf = ""
        if final:
            section = "".join(self._held)
            calls = self._section(section[len(self.marker):])
            if calls is None:
                self._content(section)
            else:
                self._calls(calls)


class MistralStream(_MarkerThenSection):
    marker = TOOL_CALLS
    mistral_ids = True

    def _section(self, text: str) -> list[Parsed] | None:
        return mistral_calls(text)

    def _advance(self, final: bool) -> None:
        self._hold_section(final)


class LlamaStream(_MarkerThenSection):
    """``<|python_tag|>`` then calls; or, with no tag, a reply that is nothing but calls (held
    while its start can still be a call object, released as content as soon as it cannot)."""

    marker = PYTHON_TAG

    def __init__(self) -> None:
        super().__init__()
        self._mode = "start"  # start -> bare (maybe a tagless call) | text
        self._scanned = 0

    def _section(self, text: str) -> list[Parsed] | None:
        return llama_calls(text)

    def _advance(self, final: bool) -> None:
        if self._mode == "start":
            head = self._buf.lstrip()
            if not head and not final:
                return
            self._mode = "bare" if head.startswith("{") else "text"
        if self._mode == "bare":
            tag_seen = self._buf.find(PYTHON_TAG, self._scanned) >= 0
            self._scanned = max(0, len(self._buf) - len(PYTHON_TAG) + 1)
            opening = match_opening(self._buf.lstrip(), CALL_OPENING)[0]
            if not tag_seen and opening != Opening.NO:
                if not final:
                    return
                calls = llama_calls(self._buf)
                if calls is not None:
                    self._calls(calls)
                    self._buf = ""
                    return
            self._mode = "text"  # not a tagless call: plain text that may still hold the tag
        self._hold_section(final)


class GenericStream(ToolStreamParser):
    """The whole reply is JSON: ``{"tool_calls": [...]}`` (calls at the end) or
    ``{"response": "..."}`` (its text streamed as it is decoded). Anything else is content."""

    def __init__(self) -> None:
        super().__init__()
        self._mode = "start"  # start -> json -> string -> after | calls ; or text

    def _advance(self, final: bool) -> None:
        if self._mode == "start":
            head = self._buf.lstrip()
            if not head and not final:
                return
            self._mode = "json" if head.startswith("{") else "text"
        if self._mode == "json":
            head = self._buf.lstrip()
            response, end = match_opening(head, RESPONSE_OPENING)
            calls = match_opening(head, TOOL_CALLS_OPENING)[0]
            if response == Opening.YES:
                self._mode, self._buf = "string", head[end:]
            elif calls == Opening.YES:
                self._mode = "calls"
            elif Opening.MAYBE in (response, calls) and not final:
                return
            else:
                self._mode = "text"
        if self._mode == "string":
            text, used, closed = decode_string(self._buf, final)
            self._content(text)
            self._buf = self._buf[used:]
            if not closed:
                return
            self._mode = "after"
        if self._mode == "after":  # what follows the response string: "}" or stray content
            if final:
                if self._buf.strip() != "}":
                    self._content(self._buf)
                self._buf = ""
            return
        if self._mode == "calls":
            if final:
                parsed = generic_calls(self._buf)
                if parsed is None:
                    self._content(self._buf)
                else:
                    self._calls(parsed)
                self._buf = ""
            return
        self._content(self._buf)  # text
        self._buf = ""
