"""The server's operational endpoints' content: ``GET /props`` (the settings under llama.cpp's
names), the Prometheus text of ``GET /metrics`` and the checks of the ``/slots`` actions (the
file names they may use inside ``--slot-save-path``). The routes themselves are in
:mod:`pyllm.server.app`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.runtime.sampling import DEFAULTS as SAMPLING_DEFAULTS
from pyllm.runtime.steps import UNTIL_DONE
from pyllm.server.schemas import ApiError, ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from pyllm.server.app import ServerConfig, _State
    from pyllm.server.engine import Engine


def max_tokens_default(request: type[CompletionRequest | ChatCompletionRequest]) -> int:
    """The token limit a request of this kind gets when it sends none, in llama.cpp's n_predict
    spelling (-1 = until an end token or a full context), read from the request schema."""
    default = request.model_fields["max_tokens"].default
    return UNTIL_DONE if default is None else int(default)


def props(config: ServerConfig, eng: Engine) -> dict[str, Any]:
    """``GET /props``: the server's settings under llama.cpp's field names, so that clients
    written for llama.cpp's server read them unchanged. The sampling defaults come from
    :data:`pyllm.runtime.sampling.DEFAULTS` (their one definition): the chat page fills its
    fields from here rather than repeating the numbers."""
    params: dict[str, Any] = {name: dict(value) if isinstance(value, Mapping) else value
                              for name, value in SAMPLING_DEFAULTS.items()}
    chat_limit = max_tokens_default(ChatCompletionRequest)
    # llama.cpp has one default limit; here the OpenAI completions route keeps OpenAI's 16
    params.update(n_predict=chat_limit, max_tokens=chat_limit)
    return {
        "default_generation_settings": {
            "n_ctx": eng.n_ctx,  # per slot
            "params": params,
            "max_tokens_by_route": {
                "/v1/chat/completions": chat_limit,
                "/v1/completions": max_tokens_default(CompletionRequest)},
        },
        "total_slots": eng.n_parallel,
        "model_alias": config.model_id,
        "model_path": str(eng.model.model_path),
        "chat_template": eng.model.chat_template or "",
    }


SLOT_ACTIONS = ("save", "restore", "erase")


def check_slot_action(id_slot: str, action: str, folder: str | None) -> None:
    """What is wrong with a /slots request before its body is read (ApiError)."""
    if action not in SLOT_ACTIONS:
        raise ApiError(400, f"unknown slot action {action!r} (save, restore or erase)",
                       param="action")
    if not id_slot.isdigit():
        raise ApiError(400, f"slot id must be an integer, got {id_slot!r}")
    if action != "erase" and folder is None:
        raise ApiError(501, "slot saving is off: start the server with --slot-save-path DIR",
                       "not_supported_error")


def slot_target(id_slot: str, action: str, folder: str | None, body: Mapping[str, Any]
                ) -> tuple[int, Path | None]:
    """The slot and the file of a checked /slots request (ApiError for a bad file name or,
    for a restore, a missing file)."""
    if action == "erase":
        return int(id_slot), None
    name = body.get("filename")
    if not isinstance(name, str) or not valid_slot_filename(name):
        raise ApiError(400, "filename must be a plain file name (no '/', '\\', '..', leading "
                       "'.' or NUL; at most 255 bytes)", param="filename")
    assert folder is not None
    path = Path(folder) / name
    if action == "restore" and not path.is_file():
        raise ApiError(404, f"no saved slot {name!r}", param="filename")
    return int(id_slot), path


def valid_slot_filename(name: str) -> bool:
    """A file name the slot actions may use inside --slot-save-path: nothing that leaves it."""
    return (0 < len(name.encode("utf-8", "surrogatepass")) <= 255 and "/" not in name
            and "\\" not in name and "\0" not in name and not name.startswith(".")
            and name not in ("..", "."))


def metrics_text(state: _State) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                         else f"{name}{labels} {value}")

    metric("pyllm_http_requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(state.http.items())])
    eng = state.engine
    metric("pyllm_model_loaded", "gauge", "1 once the model is loaded and serving.",
           [("", 1 if eng is not None else 0)])
    if eng is not None:
        st = eng.stats
        metric("pyllm_requests_total", "counter",
               "Generation requests accepted (one per choice; embeddings are counted by "
               "pyllm_embeddings_total).",
               [("", st.requests_total)])
        metric("pyllm_requests_rejected_total", "counter", "Requests refused: queue full.",
               [("", st.requests_rejected)])
        metric("pyllm_requests_finished_total", "counter", "Requests finished, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(st.finished.items())])
        metric("pyllm_prompt_tokens_total", "counter", "Prompt tokens received.",
               [("", st.prompt_tokens_total)])
        metric("pyllm_prompt_tokens_evaluated_total", "counter",
               "Prompt tokens evaluated (the rest came from a slot's cache).",
               [("", st.prompt_tokens_evaluated)])
        metric("pyllm_completion_tokens_total", "counter", "Tokens generated.",
               [("", st.completion_tokens_total)])
        metric("pyllm_cache_ram_hits_total", "counter",
               "Prompts that continued a slot cache restored from host memory (--cache-ram).",
               [("", st.cache_ram_hits)])
        metric("pyllm_cache_ram_bytes", "gauge", "Host memory the kept slot caches take.",
               [("", st.cache_ram_bytes)])
        metric("pyllm_draft_tokens_total", "counter",
               "Tokens drafted by speculative decoding (--spec).",
               [("", st.draft_tokens_total)])
        metric("pyllm_draft_tokens_accepted_total", "counter",
               "Drafted tokens the model kept.", [("", st.draft_tokens_accepted)])
        metric("pyllm_embeddings_total", "counter", "Embeddings computed.",
               [("", st.embeddings_total)])
        metric("pyllm_embedding_tokens_total", "counter", "Tokens embedded.",
               [("", st.embedding_tokens_total)])
        metric("pyllm_queue_depth", "gauge", "Requests waiting for a slot.",
               [("", eng.queue_depth)])
        metric("pyllm_slots_busy", "gauge", "Slots generating or evaluating a prompt.",
               [("", eng.active)])
        metric("pyllm_slots_total", "gauge", "Slots (--parallel).", [("", eng.n_parallel)])
        metric("pyllm_tokens_per_second", "gauge",
               "Generated tokens per second over the last 10 s, all slots together.",
               [("", float(eng.tokens_per_second()))])
        metric("pyllm_steps_total", "counter", "Batched forward steps.", [("", st.steps_total)])
        metric("pyllm_step_seconds_total", "counter", "Seconds spent in batched forward steps.",
               [("", float(st.step_seconds_total))])
    return "\n".join(lines) + "\n"


__all__ = ["check_slot_action", "max_tokens_default", "metrics_text", "props", "slot_target",
           "valid_slot_filename"]
