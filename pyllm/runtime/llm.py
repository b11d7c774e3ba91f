"""The LLM object: a loaded model with one inference context; evaluate tokens, get logits,
manage the KV cache.

Loading is :class:`pyllm.runtime.loaded.LoadedModel` (weights memory-mapped, near-instant); the
context is made by :meth:`LoadedModel.new_context` with the checks every context gets. Every forward
call is one call into C++ with the GIL released.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.errors import ContextError, ModelError, PipelineError, PyllmError
from pyllm.formats.arch import HParams
from pyllm.runtime.footprint import DEFAULT_KV_TYPE, KV_ELEMENT_TYPES, check_kv_type
from pyllm.runtime.loaded import (
    DEFAULT_N_BATCH,
    LoadedModel,
    cap_threads,
    check_count,
    check_threads,
    clamp_batch,
)
from pyllm.runtime.lora import AdapterSet, lora_specs
from pyllm.runtime.steps import common_prefix

if TYPE_CHECKING:
    import numpy as np

    from pyllm.runtime.lora import LoraSpec
    from pyllm.runtime.mpi import Pipeline
    from pyllm.runtime.speculative import Drafter
    from pyllm.tokenizer import Tokenizer

# The kv_type names (pyllm.runtime.footprint holds them, with their element types).
KV_TYPES = tuple(KV_ELEMENT_TYPES)

__all__ = ["KV_TYPES", "LLM", "LLMState", "LoadedModel", "cap_threads"]


class _Empty:
    """The logits of no tokens, as a pending forward gives them."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab

    def wait(self) -> np.ndarray:
        import numpy as np

        return np.zeros((0, self.n_vocab), dtype=np.float32)


@dataclass(frozen=True)
class LLMState:
    """A snapshot of the context: cached tokens and their K/V entries, and the LoRA adapters
    they were computed with ((file, scale) pairs; a state loads only under the same ones)."""

    tokens: tuple[int, ...]
    kv: bytes
    last_logits: np.ndarray | None
    lora: tuple[tuple[str, float], ...] = ()


class LLM:
    """A loaded model plus one inference context (KV cache of ``n_ctx`` positions).

    Not thread-safe: use one LLM per thread (two LLMs in two threads run independently).
    ``model`` is the :class:`pyllm.runtime.loaded.LoadedModel` (weights, tokenizer, template).
    ``pipeline``: run the layers over the ranks of an MPI job (:class:`pyllm.Pipeline`, on
    rank 0; the other ranks serve it).

    Args:
        model_path: The GGUF file (any shard of a split model); None: the default model,
            downloaded once.
        n_ctx: Context size in tokens.
        n_threads: Threads of the forward (None: the physical cores this process may use).
        n_batch: Prompt tokens per forward chunk.
        seed: The sampling seed (-1: random).
        kv_type: The KV cache type: ``f16``, ``q8_0`` or ``f32``.
        repack: Copy the matrices into the CPU's faster rows16 layout at load.
        n_gpu_layers: Offload the last N layers to a GPU (-1: all, and the output matrix).
        device: The device to offload to (``opencl``, ``cuda:1``, ``cpu``; None: the build's
            GPU backend).
        lora: LoRA adapters: paths, or (path, scale) pairs.
        draft_model: The default drafter of speculative decoding (a NgramDrafter or
            DraftModel).
        pipeline: Run the layers over the ranks of an MPI job (rank 0 only).
        repack_cache: Save the rows16 copies at a file's first load and map them at later
            loads (a cold start's first token sooner; :mod:`pyllm.runtime.repack_cache`):
            None follows ``$PYLLM_REPACK_CACHE`` (on by default), False turns it off, a path
            is the folder of the saved copies.
        verbose: Print load information to stderr.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, n_ctx: int = 2048,
                 n_threads: int | None = None, n_batch: int = DEFAULT_N_BATCH, seed: int = -1,
                 kv_type: str = DEFAULT_KV_TYPE, repack: bool = True, n_gpu_layers: int = 0,
                 device: str | None = None, lora: Sequence[LoraSpec] | None = None,
                 draft_model: Drafter | None = None, pipeline: Pipeline | None = None,
                 repack_cache: bool | str | os.PathLike[str] | None = None,
                 verbose: bool = False) -> None:
        # what can be checked without the file is checked before it is opened
        check_count("n_ctx", n_ctx)
        check_count("n_batch", n_batch)
        check_threads(n_threads)
        check_kv_type(kv_type)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < -1:
            raise ContextError(f"seed must be an integer >= -1 (-1 = random), got {seed!r}")
        n_threads = cap_threads(n_threads)
        self.verbose = verbose
        self.seed = seed  # default seed of generate/stream/chat/create_* (-1: a random one)
        self._lock = threading.Lock()
        self.model = LoadedModel(model_path, n_threads=n_threads, repack=repack,
                                 n_gpu_layers=n_gpu_layers, device=device, verbose=verbose,
                                 pipeline=pipeline, repack_cache=repack_cache)
        try:
            self._ctx: Any = self.model.new_context(n_ctx, n_batch=n_batch, kv_type=kv_type,
                                                    stacklevel=3)
        except PyllmError:
            self.model.close()
            raise
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.n_batch = clamp_batch(n_batch, n_ctx)
        self._adapters = AdapterSet(self.model)
        self._lora: list[tuple[Path, float]] = []
        if lora:
            try:
                self._apply_lora(lora_specs(lora))
            except PyllmError:
                self.model.close()
                raise
        self._tokens: list[int] = []
        # the last token's logits: a numpy array, or a float32 memoryview after the decode
        # loop's steps (_prompt_logits / _token_logits)
        self._last_logits: np.ndarray | memoryview | None = None
        # the default drafter of generate / stream / chat / create_* (speculative decoding; a
        # call's drafter= overrides it), as llama-cpp-python's Llama(draft_model=...)
        self.draft_model = draft_model
        if verbose:
            hp = self.hparams
            from pyllm.runtime.loaded import core_module

            print(f"pyllm: {hp.arch} {hp.n_layer} layers, n_embd {hp.n_embd}, {hp.n_head} heads "
                  f"({hp.n_head_kv} KV), vocab {hp.n_vocab}, n_ctx {n_ctx}, "
                  f"{self._ctx.n_threads} threads, {core_module().active_isa()} kernels",
                  file=sys.stderr)

    # ---- the loaded model's attributes ------------------------------------------------------

    @property
    def model_path(self) -> Path:
        return self.model.model_path

    @property
    def metadata(self) -> dict[str, Any]:
        return self.model.metadata

    @property
    def chat_template(self) -> str | None:
        """The model file's Jinja chat template (``tokenizer.chat_template``), if it has one."""
        return self.model.chat_template

    @property
    def hparams(self) -> HParams:
        return self.model.hparams

    @property
    def _model(self) -> Any:
        """The ``pyllm._core.Model`` (None once closed)."""
        return self.model.core

    @property
    def _reader(self) -> Any:
        """The GGUF reader whose file mapping the weights view."""
        return self.model._reader

    # ---- properties ---------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    @property
    def n_threads(self) -> int:
        return int(self._ctx.n_threads)

    @property
    def tokens(self) -> list[int]:
        """Tokens whose K/V entries are cached (the context so far)."""
        return list(self._tokens)

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    # ---- tokenization hooks -------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """Token ids of a text (see :meth:`pyllm.Tokenizer.encode`).

        Args:
            text: The text.
            add_special: Add BOS/EOS where the vocabulary asks for them.
            parse_special: Recognise control tokens written in the text.

        Returns:
            The token ids.
        """
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], skip_special: bool = False) -> str:
        """The text of token ids (see :meth:`pyllm.Tokenizer.decode`).

        Args:
            tokens: The token ids.
            skip_special: Drop control and unknown tokens.

        Returns:
            The text.
        """
        return self.tokenizer.decode(list(tokens), skip_special=skip_special)

    # ---- evaluation ---------------------------------------------------------------------------

    def _check_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        import numpy as np

        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ModelError("tokens must be a 1-D sequence of ints")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ModelError(f"tokens must be integers, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ModelError(f"token id {bad} is outside the vocabulary (n_vocab {self.n_vocab})")
        return arr.astype(np.int32, copy=False)

    def _decode(self, arr: np.ndarray, logits: str) -> np.ndarray | None:
        return self._forward(arr.tolist(), lambda: self._ctx.decode(arr, logits))  # type: ignore[no-any-return]

    def _forward(self, new: list[int], call: Any) -> Any:
        """``call()`` (one forward of the tokens ``new`` after the cached ones) with the checks
        and error words every forward shares; the tokens are cached after it."""
        if self._ctx is None:
            raise ModelError("this LLM has been closed")
        if len(self._tokens) + len(new) > self.n_ctx:
            raise ContextError(f"{len(self._tokens)} cached + {len(new)} new tokens exceed the "
                               f"context size n_ctx={self.n_ctx}")
        with self._lock:
            try:
                out = call()
            except IndexError as e:
                raise ContextError(str(e)) from None
            except ValueError as e:
                raise ModelError(str(e)) from None
        self._tokens.extend(new)
        return out

    def eval(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append tokens to the context; returns the logits after the last one (n_vocab,).

        Args:
            tokens: Token ids.

        Returns:
            The logits after the last token, float32 (n_vocab,).
        """
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ModelError("eval needs at least one token")
        out = self._decode(arr, "last")
        assert out is not None
        self._last_logits = out
        return out

    def eval_token(self, token: int) -> np.ndarray:
        """:meth:`eval` of one token, without the array checks (the decode loop's hot path).

        Args:
            token: A token id.

        Returns:
            The logits after it, float32 (n_vocab,).
        """
        import numpy as np

        if not 0 <= token < self.hparams.n_vocab:
            raise ModelError(f"token id {token} is outside the vocabulary (n_vocab {self.n_vocab})")
        out = self._decode(np.array((token,), dtype=np.int32), "last")
        assert out is not None
        self._last_logits = out
        return out

    # The decode loop's two calls: eval_prompt / eval_token giving the logits as a float32
    # memoryview where the context makes them without numpy (a cold `pyllm run` reaches its
    # first token without importing numpy, ~45-90 ms), else the numpy array those give.

    def _prompt_logits(self, tokens: list[int]) -> Any:
        """:meth:`eval_prompt` for the decode loop (see above)."""
        if not tokens or not self._fast_ids(tokens):  # (eval_prompt words what is wrong)
            return self.eval_prompt(tokens)
        return self._decode_list(tokens[self._reuse_prefix(tokens):])

    def _token_logits(self, token: int) -> Any:
        """:meth:`eval_token` for the decode loop (see above)."""
        if not self._fast_ids((token,)):
            return self.eval_token(token)
        return self._decode_list([token])

    def _fast_ids(self, tokens: Sequence[int]) -> bool:
        """Whether the context decodes lists (not an MPI pipeline's) and every token is a
        Python int in the vocabulary (else the numpy path checks and words them)."""
        n_vocab = self.n_vocab
        return getattr(self._ctx, "decode_list", None) is not None and all(
            type(t) is int and 0 <= t < n_vocab for t in tokens)

    def _decode_list(self, new: list[int]) -> memoryview:
        out = memoryview(self._forward(new, lambda: self._ctx.decode_list(new))).cast("f")
        self._last_logits = out
        return out

    def eval_all(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append tokens to the context in one forward call; returns the logits after each of
        them, float32 (n_tokens, n_vocab) (speculative decoding checks a draft this way).

        Args:
            tokens: Token ids.

        Returns:
            The logits after each token, float32 (n_tokens, n_vocab).
        """
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ModelError("eval_all needs at least one token")
        out = self._decode(arr, "all")
        assert out is not None
        self._last_logits = out[-1].copy()
        return out

    def eval_prompt(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Make the context hold exactly ``tokens``, reusing the longest cached common prefix;
        returns the logits after the last token.

        Args:
            tokens: The whole prompt's token ids.

        Returns:
            The logits after the last token, float32 (n_vocab,).
        """
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ModelError("the prompt is empty")
        return self.eval(arr[self._reuse_prefix(arr.tolist()):])

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Drops the cached tokens after the longest common prefix with ``tokens`` (but the
        last token is always evaluated again, for its logits); returns how many are kept."""
        keep = min(common_prefix(self._tokens, tokens), len(tokens) - 1)
        self._truncate(keep)
        return keep

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Teacher-forced logits for every position: float32 array (n_tokens, n_vocab).

        Starts from an empty context (the result does not depend on earlier calls).

        Args:
            tokens: Token ids (at most n_ctx).

        Returns:
            The logits after each token, float32 (n_tokens, n_vocab).
        """
        import numpy as np

        arr = self._check_tokens(tokens)
        if arr.size == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        self.reset()
        out = self._decode(arr, "all")
        assert out is not None
        self._last_logits = out[-1].copy()
        return out

    def logits_each(self, chunks: Iterable[Sequence[int] | np.ndarray]) -> Iterator[np.ndarray]:
        """:meth:`logits` of each chunk in turn (perplexity's chunks). Over an MPI pipeline the
        next chunk's forward starts before the last one's logits are back, so the ranks work
        on two chunks at once; elsewhere it is ``logits`` in a loop.

        Args:
            chunks: Token id sequences, each evaluated from an empty context.

        Yields:
            Each chunk's logits, float32 (n_tokens, n_vocab), in order.
        """
        import numpy as np

        submit = getattr(self._ctx, "submit", None)
        if submit is None:
            for chunk in chunks:
                yield self.logits(chunk)
            return
        waiting: Any = None
        try:
            for chunk in chunks:
                arr = self._check_tokens(chunk)
                if arr.size > self.n_ctx:
                    raise ContextError(f"{arr.size} tokens exceed the context size "
                                       f"n_ctx={self.n_ctx}")
                self.reset()  # every rank forgets the chunk before (in order, after its forward)
                n = arr.size
                with self._lock:
                    forward = submit(arr, np.zeros(n, np.int32), np.ones(n, np.uint8)) \
                        if n else _Empty(self.n_vocab)
                self._tokens = arr.tolist()
                if waiting is not None:
                    done, waiting = waiting, None
                    yield done.wait()
                waiting = forward
            if waiting is not None:
                done, waiting = waiting, None
                out = done.wait()
                if len(out):
                    self._last_logits = out[-1].copy()
                yield out
        finally:
            if waiting is not None:  # the caller stopped early: the forward still lands
                waiting.wait()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens of the context and drop the rest of its KV cache (a
        rejected draft, an edited conversation); nothing happens when it holds ``n`` or fewer.

        Args:
            n: Tokens to keep.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ContextError(f"truncate needs a token count >= 0, got {n!r}")
        self._truncate(n)

    def shift_context(self, keep: int, n_discard: int) -> None:
        """Context shift (llama.cpp's): drop the cached tokens [keep, keep + n_discard) and move
        the later ones down, their keys re-rotated to the new positions, as if the remaining
        tokens had been evaluated there (up to the K/V cache type's rounding). ContextError for
        bounds outside the cached tokens or a RoPE mode that cannot be moved exactly (dynamic
        NTK), DeviceError with layers offloaded to a GPU.

        Args:
            keep: Cached tokens kept at the start.
            n_discard: Tokens dropped after them.
        """
        for name, v in (("keep", keep), ("n_discard", n_discard)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ContextError(f"{name} must be an integer, got {v!r}")
        if self._ctx is None:
            raise ModelError("this LLM has been closed")
        with self._lock:
            try:
                self._ctx.seq_shift(0, keep, n_discard)
            except (IndexError, ValueError) as e:
                raise ContextError(f"cannot shift the context: {e}") from None
        del self._tokens[keep:keep + n_discard]
        self._last_logits = None

    def _truncate(self, n: int) -> None:
        if self._ctx is not None and n < len(self._tokens):
            self._ctx.truncate(n)
            del self._tokens[n:]
            self._last_logits = None

    def reset(self) -> None:
        """Forget the context (the KV cache is reused, not reallocated)."""
        self._truncate(0)

    # ---- embeddings -------------------------------------------------------------------------

    def embed(self, text_or_tokens: str | Sequence[int], normalize: bool = True) -> np.ndarray:
        """Mean-pooled final hidden states of a text (float32, n_embd), L2-normalized by default.

        Uses the context's KV cache, so the cached conversation is forgotten.

        Args:
            text_or_tokens: A text, or token ids.
            normalize: Scale the vector to unit L2 norm.

        Returns:
            The embedding, float32 (n_embd,).
        """
        import numpy as np

        if isinstance(text_or_tokens, str):
            tokens = self.tokenize(text_or_tokens, add_special=True)
        else:
            tokens = list(text_or_tokens)
        if not hasattr(self._ctx, "embed"):
            raise PipelineError("embeddings need every layer in one process: not in an MPI "
                                "pipeline")
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ModelError("cannot embed an empty input")
        if arr.size > self.n_ctx:
            raise ContextError(f"the input has {arr.size} tokens; the context holds {self.n_ctx}")
        if self._ctx is None:
            raise ModelError("this LLM has been closed")
        self._tokens.clear()
        self._last_logits = None
        with self._lock:
            vec = np.asarray(self._ctx.embed(arr, 0))
        if normalize:
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec = vec / norm
        return vec.astype(np.float32, copy=False)

    def create_embedding(self, input: str | Sequence[str]) -> dict[str, Any]:  # noqa: A002
        """llama-cpp-python / OpenAI-shaped embeddings of one text or a list of texts.

        Args:
            input: A text or a list of texts.

        Returns:
            ``{"object": "list", "data": [{"embedding", "index"}], "model", "usage"}``.
        """
        texts = [input] if isinstance(input, str) else list(input)
        data, n_tokens = [], 0
        for i, text in enumerate(texts):
            tokens = self.tokenize(text, add_special=True)
            n_tokens += len(tokens)
            data.append({"object": "embedding", "index": i,
                         "embedding": self.embed(tokens).tolist()})
        return {"object": "list", "data": data, "model": str(self.model_path),
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    # ---- generation -------------------------------------------------------------------------

    def stream(self, prompt: str | Sequence[int], max_tokens: int | None = 128,
               stop: str | Sequence[str] | None = None, **sampling: Any) -> Iterator[str]:
        """Generate a continuation of ``prompt`` and yield text pieces as they become final.

        ``sampling`` takes the :class:`pyllm.runtime.sampling.SamplingParams` fields (temperature,
        top_k, top_p, min_p, typical_p, tfs_z, repeat_penalty, repeat_last_n, presence_penalty,
        frequency_penalty, mirostat, mirostat_tau, mirostat_eta, logit_bias, seed), and
        ``drafter=`` a :class:`~pyllm.runtime.speculative.NgramDrafter` or
        :class:`~pyllm.runtime.speculative.DraftModel` for speculative decoding (the same text,
        faster where the drafts hold; default: the LLM's ``draft_model``).

        Args:
            prompt: Text, or token ids.
            max_tokens: Tokens to generate at most (-1 or None: until an end-of-text token or a
                full context; 0: none).
            stop: Strings that end the generation (not included).
            **sampling: Sampling settings, ``grammar`` / ``json_schema`` / ``regex``,
                ``drafter``, ``context_shift``.

        Yields:
            Text pieces, each final (never part of a UTF-8 character or of a possible stop
                string).
        """
        from pyllm.runtime.completions import make_generation
        from pyllm.runtime.generation import prompt_tokens

        gen = make_generation(self, prompt_tokens(self, prompt), max_tokens=max_tokens,
                              stop=stop, **sampling)
        for piece in gen:
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 128,
                 stop: str | Sequence[str] | None = None, **sampling: Any) -> str:
        """The whole continuation of ``prompt`` as one string (see :meth:`stream`).

        Args:
            prompt: Text, or token ids.
            max_tokens: Tokens to generate at most, as for :meth:`stream`.
            stop: Strings that end the generation (not included).
            **sampling: As for :meth:`stream`.

        Returns:
            The generated text.
        """
        return "".join(self.stream(prompt, max_tokens, stop, **sampling))

    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int | None = None,
             chat_format: str | None = None, stream: bool = False,
             **sampling: Any) -> str | Iterator[str]:
        """The assistant's reply to ``messages`` (dicts with ``role`` and ``content``), using
        the model's chat template or the named built-in ``chat_format``.

        Args:
            messages: The conversation: dicts with ``role`` and ``content``.
            max_tokens: Tokens to generate at most (None or -1: until the end of the turn or a
                full context).
            chat_format: A built-in format name instead of the model's template.
            stream: Yield text pieces instead of returning the whole reply.
            **sampling: As for :meth:`stream`.

        Returns:
            The reply, or an iterator of its pieces with ``stream=True``.
        """
        from pyllm.runtime.completions import make_generation
        from pyllm.runtime.generation import chat_prompt

        tokens, stops = chat_prompt(self, messages, chat_format)
        gen = make_generation(self, tokens, max_tokens=max_tokens, stop=sampling.pop("stop", None),
                              extra_stop=stops, **sampling)
        pieces = (p.text for p in gen if p.text)
        return pieces if stream else "".join(pieces)

    def create_completion(self, prompt: str | Sequence[int], **kwargs: Any) -> Any:
        """llama-cpp-python compatible: OpenAI-shaped dict, or chunk iterator with stream=True.

        Args:
            prompt: Text, or token ids.
            **kwargs: llama-cpp-python's arguments (``max_tokens``, ``stop``, ``stream``,
                ``logprobs``, ``echo``, sampling settings, ``grammar``, ...).

        Returns:
            A ``text_completion`` dict, or with ``stream=True`` an iterator of chunk dicts.
        """
        from pyllm.runtime.completions import create_completion

        return create_completion(self, prompt, **kwargs)

    def create_chat_completion(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """llama-cpp-python compatible chat completion (OpenAI ``chat.completion`` dicts).

        Args:
            messages: The conversation (OpenAI messages, tool calls and results included).
            **kwargs: llama-cpp-python's arguments (``max_tokens``, ``stream``, ``tools``,
                ``tool_choice``, ``response_format``, ``logprobs``, sampling settings, ...).

        Returns:
            A ``chat.completion`` dict, or with ``stream=True`` an iterator of
                ``chat.completion.chunk`` dicts.
        """
        from pyllm.runtime.completions import create_chat_completion

        return create_chat_completion(self, messages, **kwargs)

    __call__ = create_completion

    # ---- LoRA adapters ------------------------------------------------------------------------

    @property
    def lora(self) -> list[tuple[Path, float]]:
        """The adapters applied now: (file, scale)."""
        return list(self._lora)

    def set_lora(self, lora: Sequence[LoraSpec] | None) -> None:
        """Apply these adapters (``["a.gguf", ("b.gguf", 0.5)]``; None or [] = none) from now
        on, without reloading the model. Files already used are not read again. The cached
        context was computed with the old adapters, so it is dropped.

        Args:
            lora: Adapter paths or (path, scale) pairs; None or [] for none.
        """
        self._apply_lora(lora_specs(lora))
        self._truncate(0)

    def _lora_key(self) -> tuple[tuple[str, float], ...]:
        return tuple((str(p.resolve()), s) for p, s in self._lora)

    def _apply_lora(self, specs: list[tuple[Path, float]]) -> None:
        with self._lock:
            mix = self._adapters.mix(specs)
            self._ctx.set_lora_adapters(self._adapters.cores())
            self._ctx.seq_set_lora(0, mix)
            self._lora = specs

    # ---- state --------------------------------------------------------------------------------

    @property
    def model_identity(self) -> str:
        """What a saved state is bound to: SHA-256 of the model's metadata and tensor table."""
        return self.model.identity

    def save_state(self) -> LLMState:
        """A snapshot of the context, to continue from later with :meth:`load_state`.

        Returns:
            The cached tokens, their K/V entries, the last logits and the LoRA adapters.
        """
        import numpy as np

        last = None if self._last_logits is None else np.array(self._last_logits, np.float32)
        return LLMState(tuple(self._tokens), bytes(self._ctx.save_state()), last,
                        self._lora_key())

    def load_state(self, state: LLMState) -> None:
        """Make the context what :meth:`save_state` saw.

        Args:
            state: A snapshot of this model (with the same LoRA adapters and KV type).

        Raises:
            ContextError: The state was computed with other LoRA adapters, or does not fit this
                context.
        """
        if not isinstance(state, LLMState):
            raise PyllmError("load_state expects an LLMState from save_state()")
        if state.lora != self._lora_key():
            raise ContextError(f"this state was computed with LoRA adapters {list(state.lora)}, "
                               f"the model now applies {list(self._lora_key())}: set_lora() "
                               "them first")
        try:
            self._ctx.load_state(state.kv)
        except ValueError as e:
            raise ContextError(f"cannot load state: {e}") from None
        self._tokens = list(state.tokens)
        self._last_logits = None if state.last_logits is None else state.last_logits.copy()

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the context and the mapping (the object is unusable afterwards)."""
        ctx, self._ctx = self._ctx, None
        if hasattr(ctx, "close"):  # a pipeline's context: dropped on every rank now
            ctx.close()
        self.model.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
