"""Extra JSON configs merged over a checkpoint's own config, and fastllm-style overrides.

Owns: reading and merging the ``--config`` JSON files (later keys win, shallowly, the way
LLaMA2-Accessory merges ``params.json`` with e.g. a PEFT json; fastllm's dotted
``rope_scaling.type`` / ``rope_scaling.factor`` update the nested ``rope_scaling`` object), and
turning fastllm's Llama-like keys into GGUF metadata:

    tokenizer_add_dummy_prefix          -> tokenizer.ggml.add_space_prefix
    tokenizer_remove_extra_whitespaces  -> tokenizer.ggml.remove_extra_whitespaces
    bos_token_id / eos_token_id         -> tokenizer.ggml.bos_token_id / eos_token_id
    pre_prompt, user_role, bot_role,    -> tokenizer.chat_template (a Jinja template that
    history_sep                            renders exactly like ChatFormat.from_fastllm)

``rope_theta`` and ``rope_scaling`` need no translation here: they are ordinary config keys,
read by the converters with the rest of the hyper-parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pyllm.errors import ConvertError

ConfigSource = str | os.PathLike[str] | Mapping[str, Any]

CHAT_KEYS = ("pre_prompt", "user_role", "bot_role", "history_sep")
_ROPE_PREFIX = "rope_scaling."


def read_config(source: ConfigSource) -> dict[str, Any]:
    """A JSON object from a file (or a mapping, copied)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read config: {e.strerror or e}") from None
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def merge_config(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overlay`` (shallow: a key's whole value is replaced), except that
    fastllm's dotted ``rope_scaling.<key>`` entries update one key of ``rope_scaling``."""
    out = dict(base)
    # Recent transformers write theta and scaling together as "rope_parameters", which wins
    # over "rope_scaling"/"rope_theta" when read: route overrides there when it is present.
    params = "rope_parameters" if isinstance(out.get("rope_parameters"), Mapping) else None
    for key, value in overlay.items():
        if not isinstance(key, str):
            raise ConvertError(f"config keys must be strings, got {key!r}")
        if key.startswith(_ROPE_PREFIX):
            sub = key[len(_ROPE_PREFIX):]
            target = params or "rope_scaling"
            rope = out.get(target)
            rope = dict(rope) if isinstance(rope, Mapping) else {}
            if sub in ("type", "rope_type"):
                # transformers reads "rope_type" before "type": drop the stale spelling
                rope.pop("type", None)
                rope.pop("rope_type", None)
            rope[sub] = value
            out[target] = rope
        elif key == "rope_scaling" and params is not None:
            theta = out[params].get("rope_theta")
            new = dict(value) if isinstance(value, Mapping) else {}
            out[params] = {"rope_theta": theta, **new} if theta is not None else new
        else:
            out[key] = value
            if key == "rope_theta" and params is not None:
                out[params] = {**out[params], "rope_theta": value}
    return out


def merge_configs(sources: Iterable[ConfigSource],
                  base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge JSON files / mappings in order over ``base``; later keys override earlier ones."""
    if isinstance(sources, (str, os.PathLike, Mapping)):
        sources = [sources]  # one config given bare
    out = dict(base or {})
    for src in sources:
        out = merge_config(out, read_config(src))
    return out


def _as_bool(key: str, value: Any) -> bool:
    # fastllm stores every dict value as text and parses booleans with std::boolalpha
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConvertError(f"{key} must be true or false, got {value!r}")


def fastllm_metadata(cfg: Mapping[str, Any], md: Mapping[str, Any]) -> dict[str, Any]:
    """GGUF metadata entries for the fastllm-style keys present in ``cfg``.

    ``md`` is the metadata built so far: token ids are checked against its vocabulary, and
    fixed token ids (``<FLM_FIX_TOKEN_n>``) in chat roles become that token's text.
    """
    out: dict[str, Any] = {}
    tokens = md.get("tokenizer.ggml.tokens")
    for key, gguf_key in (("tokenizer_add_dummy_prefix", "tokenizer.ggml.add_space_prefix"),
                          ("tokenizer_remove_extra_whitespaces",
                           "tokenizer.ggml.remove_extra_whitespaces")):
        if key in cfg:
            out[gguf_key] = _as_bool(key, cfg[key])
    for key in ("bos_token_id", "eos_token_id"):
        if key not in cfg:
            continue
        value = cfg[key]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)  # fastllm's text spelling
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConvertError(f"{key} must be a non-negative token id, got {cfg[key]!r}")
        if tokens is not None and value >= len(tokens):
            raise ConvertError(f"{key} {value} is outside the {len(tokens)}-token vocabulary")
        out[f"tokenizer.ggml.{key}"] = value
    if any(k in cfg for k in CHAT_KEYS):
        roles: dict[str, str] = {}
        for k in CHAT_KEYS:
            value = cfg.get(k, "")
            if not isinstance(value, str):
                raise ConvertError(f"{k} must be a string, got {value!r}")
            roles[k] = value
        out["tokenizer.chat_template"] = fastllm_chat_template(**roles, metadata=md)
    return out


def fastllm_chat_template(pre_prompt: str = "", user_role: str = "", bot_role: str = "",
                          history_sep: str = "", *,
                          metadata: Mapping[str, Any] | None = None) -> str:
    """A Jinja chat template that renders what ``ChatFormat.from_fastllm`` renders::

        pre_prompt [system] (user_role q bot_role a history_sep)* user_role q bot_role

    A template can only produce text, so a fixed token id ``<FLM_FIX_TOKEN_n>`` becomes the
    text of token ``n`` (as the tokenizer built from ``metadata`` renders it); that text maps
    back to the single id when tokenized with special-token parsing if the token is a control or
    user-defined one, which is what fixed ids in such layouts are.
    """
    from pyllm.chat import parse_fastllm
    from pyllm.errors import ChatTemplateError, PyllmError

    tokenizer: Any = None

    def text(value: str) -> str:
        nonlocal tokenizer
        try:
            pieces = parse_fastllm(value)
        except ChatTemplateError as e:
            raise ConvertError(f"chat roles: {e}") from None
        out: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            if metadata is None or "tokenizer.ggml.tokens" not in metadata:
                raise ConvertError(f"chat roles use fixed token id {piece.id}, but the model "
                                   "has no vocabulary to give its text")
            n_tokens = len(metadata["tokenizer.ggml.tokens"])
            if piece.id >= n_tokens:
                raise ConvertError(f"fixed token id {piece.id} is outside the "
                                   f"{n_tokens}-token vocabulary")
            if tokenizer is None:
                from pyllm.tokenizer import Tokenizer

                try:
                    tokenizer = Tokenizer.from_metadata(metadata)
                except PyllmError as e:
                    raise ConvertError(f"chat roles: cannot build the tokenizer: {e}") from None
            out.append(tokenizer.token_to_piece(piece.id))
        return "".join(out)

    def lit(value: str) -> str:
        # A Jinja expression printing ``value``: JSON string syntax is valid Jinja string syntax
        # (non-ASCII kept raw: Jinja would split an escaped astral character into surrogates).
        t = text(value)
        return "{{ " + json.dumps(t, ensure_ascii=False) + " }}" if t else ""

    pre, user, bot, sep = lit(pre_prompt), lit(user_role), lit(bot_role), lit(history_sep)
    return (
        pre
        + "{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
        + "{% if messages | length <= offset %}"
        + "{{ raise_exception('the conversation has no user message') }}{% endif %}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'system' %}"
        + "{% if not loop.first %}{{ raise_exception('a system message may only come first') }}"
        + "{% endif %}{{ message['content'] }}"
        + "{% else %}"
        + "{% if message['role'] != ('user' if (loop.index0 - offset) % 2 == 0 else 'assistant')"
        + " %}{{ raise_exception('chat turns must alternate user/assistant starting with user')"
        + " }}{% endif %}"
        + "{% if message['role'] == 'user' %}"
        + user + "{{ message['content'] }}"
        + "{% if not loop.last or add_generation_prompt %}" + bot + "{% endif %}"
        + "{% else %}"
        + "{{ message['content'] }}" + sep
        + "{% if loop.last and add_generation_prompt %}" + bot + "{% endif %}"
        + "{% endif %}{% endif %}{% endfor %}"
    )
