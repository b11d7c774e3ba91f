"""A loaded model (weights, hyper-parameters, tokenizer, chat template) and the contexts made
from it.

Loading and running are separate: :class:`LoadedModel` opens the GGUF file, reads the
hyper-parameters and hands the (memory-mapped, optionally repacked) weights to
``pyllm._core.Model``; :meth:`LoadedModel.new_context` makes a ``pyllm._core.Context`` (the KV
cache of ``n_seq`` sequences of ``n_ctx`` positions plus scratch) after the checks every context
needs: the KV type, the memory it will take, a length beyond training.
:class:`pyllm.runtime.llm.LLM` is one loaded model with one single-sequence context; the server's
:class:`pyllm.server.engine.Engine` is one loaded model with one context of ``n_parallel``
slots. Several contexts may share one loaded model (the weights are read-only).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyllm.errors import ContextError, ModelError, PyllmError, PyllmWarning
from pyllm.formats.arch import HParams, ModelTensors, collect_tensors, read_hparams
from pyllm.formats.gguf.split import open_gguf
from pyllm.runtime.default_model import resolve_model_path
from pyllm.runtime.devices import plan_placement
from pyllm.runtime.footprint import (
    DEFAULT_KV_TYPE,
    MAX_COUNT,
    check_context_fits,
    check_kv_type,
    warn_if_beyond_training,
)
from pyllm.runtime.sysinfo import available_cpus

if TYPE_CHECKING:
    from pyllm.runtime.mpi import Pipeline
    from pyllm.runtime.repack_cache import Image, ImageWriter
    from pyllm.tokenizer import Tokenizer

# Tokens per forward chunk when the caller does not say (llama.cpp's -b default).
DEFAULT_N_BATCH = 512


def check_count(name: str, value: object) -> int:
    """``value`` if it is a count the C++ side takes (1 .. 2^31-1), else ContextError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_COUNT:
        raise ContextError(f"{name} must be a positive integer (at most {MAX_COUNT}), "
                           f"got {value!r}")
    return value


def check_threads(n_threads: object) -> int | None:
    """``n_threads`` if it is None (the pool's default) or a positive int, else ContextError."""
    if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                  or n_threads <= 0):
        raise ContextError(f"n_threads must be a positive integer, got {n_threads!r}")
    return n_threads


def cap_threads(n_threads: int | None, stacklevel: int = 3) -> int | None:
    """``n_threads`` capped at the CPUs this process may run on (None: the pool's default).

    More threads than CPUs only make them wait for each other: with 1000 threads on 2 CPUs a
    token took seconds. Capping warns, since the caller asked for something else;
    ``stacklevel`` makes the warning point at the user's call (3: the caller's caller).
    """
    if n_threads is None:
        return None
    cpus = available_cpus()
    if n_threads > cpus:
        warnings.warn(f"{n_threads} threads asked for but this process may use {cpus} CPUs; "
                      f"using {cpus}", PyllmWarning, stacklevel=stacklevel)
        return cpus
    return n_threads


def core_module() -> Any:
    """The compiled extension, or a ModelError saying how to build it."""
    from pyllm._native import load_core

    return load_core(ModelError)


class LoadedModel:
    """A GGUF model ready to run: hyper-parameters, weights in C++, metadata, tokenizer.

    Weights stay memory-mapped: loading parses the header and hands zero-copy views to C++
    (matrices repacked into the rows16 layout are copied, and their file pages handed back), so
    it is near-instant and memory grows only with what the forward touches. ``n_threads`` is
    the default of the contexts made from it (None: the pool's default) and what the repack
    uses. ``n_gpu_layers`` / ``device``: llama.cpp's offload (the last N layers, -1 = all and the
    output, on ``device``, e.g. ``"opencl:0"``; None picks this build's GPU backend), turned into
    a placement by :func:`pyllm.runtime.devices.plan_placement`. Or ``placement`` itself: which
    backend runs which layers, as ``(backend, first, last)`` ranges
    in layer order, the head with the last (``pyllm._core.backends()`` names this build's
    backends; the rules are in csrc/model/placement.h); empty puts everything on the CPU. Each
    backend prepares its layers' weights here, once; every context runs them there. Contexts
    hold a reference to the weights, so close the model after them.

    ``pipeline``: a :class:`pyllm.runtime.mpi.Pipeline` of several MPI ranks (on rank 0): the
    layers are split over the ranks, each loads only its own, and every context of this model
    runs across them (``n_gpu_layers`` / ``device`` apply on every rank to its share of the
    last N layers). ``layer_range``: load only layers ``[first, last)`` (and the embeddings
    where ``first`` is 0, the head where ``last`` is the layer count); the other layers are
    another process's (a ``remote`` placement range), what a pipeline's ranks do.

    Args:
        model_path: The GGUF file (any shard of a split model); None: the default model,
            downloaded once.
        n_threads: The contexts' default thread count and the repack's (None: the pool's
            default, the physical cores this process may use).
        repack: Copy the matrices into the CPU's rows16 layout at load (faster decode).
        n_gpu_layers: Offload the last N layers (-1: all, and the output matrix).
        device: The device to offload to (``opencl``, ``cuda:1``, ``cpu``; None: the build's
            GPU backend).
        placement: ``(backend, first, last)`` layer ranges in layer order (instead of
            ``n_gpu_layers`` / ``device``); empty: all on the CPU.
        verbose: Print load information (download, repack cache) to stderr.
        pipeline: Run the layers over the ranks of an MPI job (rank 0 only).
        layer_range: Load only layers ``[first, last)``; the others are another process's.
        repack_cache: The first load of a file saves its rows16 copies and later loads map
            them instead of repacking (:mod:`pyllm.runtime.repack_cache`): None follows
            ``$PYLLM_REPACK_CACHE`` (on by default); False: off; a path: the folder of the
            saved copies.

    Raises:
        ModelError: a file that is not a model pyllm runs, bad placement arguments, or too
            little memory for the weights.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *,
                 n_threads: int | None = None, repack: bool = True, n_gpu_layers: int = 0,
                 device: str | None = None, placement: Sequence[tuple[str, int, int]] = (),
                 verbose: bool = False, pipeline: Pipeline | None = None,
                 layer_range: tuple[int, int] | None = None,
                 repack_cache: bool | str | os.PathLike[str] | None = None) -> None:
        asked_threads = n_threads  # a pipeline's workers choose their own default
        if pipeline is not None and pipeline.size > 1 and n_threads is None:
            n_threads = pipeline.default_threads()
        self.n_threads = cap_threads(check_threads(n_threads))
        self.model_path = Path(resolve_model_path(model_path, quiet=not verbose))
        self.verbose = verbose
        self._reader = open_gguf(self.model_path)  # a split model: all its shards
        self._identity: str | None = None
        self._tokenizer: Tokenizer | None = None
        self.pipeline: Pipeline | None = None
        self._pipeline_id = 0
        self.layer_ranges: list[tuple[int, int]] = []  # per rank, in a pipeline
        self._repack_key: tuple[Path, str] | None = None  # (folder, key) of the repack cache
        self._repack_image: Image | None = None  # the mapped image the copies are in
        self.repack_writer: ImageWriter | None = None  # saving this load's copies
        try:
            core = core_module()
            self.hparams: HParams = read_hparams(self._reader)
            tensors = collect_tensors(self._reader, self.hparams)
            if placement and (n_gpu_layers or device is not None):
                raise ModelError("give either placement or n_gpu_layers / device, not both")
            if not placement:
                placement = plan_placement(self.hparams.n_layer, n_gpu_layers, device)
            if pipeline is not None and pipeline.size > 1:
                if layer_range is not None:
                    raise ModelError("give either pipeline or layer_range, not both")
                layer_range = self._start_pipeline(pipeline, n_threads=asked_threads,
                                                   n_gpu_layers=n_gpu_layers, device=device,
                                                   repack=repack)
            if layer_range is not None:
                placement = shard_placement(list(placement), self.hparams.n_layer, layer_range)
                tensors = shard_tensors(tensors, self.hparams.n_layer, layer_range)
            image = self._open_repack_image(core, repack_cache, placement, layer_range) \
                if repack else None
            # The tensors are views of the reader's read-only file mapping, so the pages of
            # the matrices copied into the rows16 layout can be handed back to the page cache,
            # and the embedding rows are read from the file rather than mapped in.
            table = tensors.model.get("tok_embd")  # (type, view, cols, rows, name in the file)
            embedding = self._reader.open_tensor_file(table[4]) if table else None
            try:
                self.core: Any = core.Model(self.hparams.to_core(core), tensors.model,
                                            tensors.layers, repack=bool(repack),
                                            release_source=True, n_threads=self.n_threads or 0,
                                            placement=list(placement),
                                            repack_image=image.view if image else None,
                                            repack_image_plan=image.plan if image else 0,
                                            embedding_file=embedding)
            finally:
                if embedding is not None:
                    os.close(embedding[0])  # the model keeps its own duplicate
            self._save_repack_image(image)
            # parsed, copied or read from the file: nothing of the mapping needs to stay
            self._reader.release_pages()
        except ValueError as e:
            self._fail()
            raise ModelError(f"{self.model_path}: {e}") from None
        except MemoryError:
            self._fail()
            raise ModelError(f"{self.model_path}: out of memory loading the weights") from None
        except PyllmError:
            self._fail()
            raise
        if self.pipeline is not None:
            try:
                self.worker_rss = self.pipeline.replies()  # every rank loaded its layers
            except PyllmError:
                self.close()
                raise

    def _start_pipeline(self, pipeline: Pipeline, **options: Any) -> tuple[int, int]:
        """Rank 0: split the layers, have every worker load its share (they load while this
        rank does); returns this rank's range."""
        from pyllm import __version__
        from pyllm.runtime.mpi_wire import split_layers

        n_layer = self.hparams.n_layer
        layer_bytes = [0] * n_layer
        for t in self._reader.tensors:
            if t.name.startswith("blk."):
                layer = int(t.name.split(".")[1])
                if 0 <= layer < n_layer:
                    layer_bytes[layer] += t.nbytes
        names = {t.name: t for t in self._reader.tensors}
        head = names.get("output.weight") or names.get("token_embd.weight")
        self.layer_ranges = split_layers(layer_bytes, head.nbytes if head else 0, pipeline.size,
                                         pipeline.layer_split)
        self.pipeline = pipeline
        self._pipeline_id = pipeline.new_id()
        # the path as given: each rank resolves it where it runs (mpirun starts every rank in
        # its own working folder), as the user meant it
        pipeline.command("load", self._pipeline_id, str(self.model_path), options,
                         self.layer_ranges, __version__, self.identity)
        return self.layer_ranges[0]

    def _open_repack_image(self, core: Any, repack_cache: bool | str | os.PathLike[str] | None,
                           placement: Sequence[tuple[str, int, int]],
                           layer_range: tuple[int, int] | None) -> Image | None:
        """The repack cache's image for this load, if one was saved (pyllm.runtime.repack_cache);
        remembers where to save one otherwise."""
        from pyllm.runtime import repack_cache as rc

        if repack_cache is False:
            return None
        folder = rc.cache_folder() if repack_cache in (None, True) else Path(repack_cache)
        if folder is None:
            return None
        paths = getattr(self._reader, "paths", None) or [self._reader.path]
        try:
            # the extension's version: the package's, without importlib.metadata's ~15 ms
            key = rc.cache_key(paths, isa=core.active_isa(), version=core.__version__,
                               placement=placement, layer_range=layer_range)
        except OSError:
            return None
        self._repack_key = (folder, key)
        return rc.open_image(folder, key)

    def _save_repack_image(self, image: Image | None) -> None:
        """Keeps a used image mapped; has a fresh repack saved in the background."""
        made = self.core.repack_image()
        if made is None or self._repack_key is None:
            if image is not None:
                image.close()
            return
        view, plan, reused = made
        if reused:
            self._repack_image = image
            if self.verbose and image is not None:
                print(f"pyllm: repack cache: mapped {image.path}", file=sys.stderr)
            return
        if image is not None:
            image.close()  # not this load's plan: replaced by the new one
        from pyllm.runtime.repack_cache import start_writer

        self.repack_writer = start_writer(*self._repack_key, view, plan, self.core)
        if self.verbose and self.repack_writer is not None:
            print(f"pyllm: repack cache: saving {self.repack_writer.path} in the background",
                  file=sys.stderr)

    @property
    def repack_cached(self) -> bool:
        """Whether the rows16 copies were mapped from the repack cache (not made here)."""
        return self._repack_image is not None

    def _fail(self) -> None:
        """A failed load: the file is closed; in a pipeline, the workers' replies are taken (so
        the next command finds them in step) and their shares dropped."""
        self._reader.close()
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            with contextlib.suppress(PyllmError):
                pipeline.replies()
            pipeline.command("unload", self._pipeline_id)

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's metadata (numeric arrays as numpy arrays; see
        :attr:`pyllm.formats.gguf.GGUFReader.metadata`)."""
        return self._reader.metadata

    @property
    def tensor_names(self) -> frozenset[str]:
        """The names of the model file's tensors (every shard's)."""
        return frozenset(t.name for t in self._reader.tensors)

    def tensors_table(self) -> list[list[Any]]:
        """Every tensor as ``[name, type name, dims, offset]`` (the model identity's input).

        Returns:
            One list per tensor of every shard, in file order.
        """
        return tensors_table(self._reader)

    @property
    def identity(self) -> str:
        """SHA-256 (hex) of the metadata and the tensor table: what a saved state is bound to
        (pyllm.runtime.state_file) and what the ranks of a pipeline compare, reading no
        weights."""
        if self._identity is None:
            self._identity = model_identity(self._reader)
        return self._identity

    @property
    def placement(self) -> list[tuple[str, int, int]]:
        """Where the layers run: ``(backend, first, last)`` ranges, the head with the last."""
        if self.core is None:
            raise ModelError("this model has been closed")
        return list(self.core.placement)

    @property
    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    @property
    def n_embd(self) -> int:
        return self.hparams.n_embd

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, built from the metadata on first use."""
        if self._tokenizer is None:
            from pyllm.tokenizer import Tokenizer

            # the parsed fields (arrays as memoryviews): no numpy needed to build it
            self._tokenizer = Tokenizer.from_metadata(self._reader.fields)
            self._reader.release_pages(header_only=True)  # it read the numeric arrays
            core_module().trim_heap()  # the build's temporary tables, freed between live blocks
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        """The file's Jinja chat template (``tokenizer.chat_template``), if it has one."""
        template = self._reader.fields.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    def new_context(self, n_ctx: int, *, n_batch: int = DEFAULT_N_BATCH,
                    n_threads: int | None = None, kv_type: str = DEFAULT_KV_TYPE,
                    n_seq: int = 1, stacklevel: int = 2, _local: bool = False) -> Any:
        """A ``pyllm._core.Context`` of ``n_seq`` sequences of ``n_ctx`` positions each.

        Checked here, once for every kind of context: the counts, the KV type, that the KV
        cache and scratch fit in the memory left (before allocating, with the sizes in the
        message), and a warning when ``n_ctx`` is beyond the training length (``stacklevel``
        as :func:`warnings.warn`'s from here: 2 points at the caller). ``n_batch`` is clamped
        by :func:`clamp_batch` (a longer chunk could never be filled; its scratch would be
        wasted). ``n_threads`` None takes the model's, then the pool's default.

        Args:
            n_ctx: Positions of each sequence.
            n_batch: Most tokens of one forward call (clamped as above).
            n_threads: Threads of the forward (None: the model's default).
            kv_type: The KV cache type: ``f16``, ``q8_0`` or ``f32``.
            n_seq: Sequences (the server's slots), each of ``n_ctx`` positions.
            stacklevel: Where the beyond-training warning points (2: the caller).
            _local: In a pipeline, this rank's own context rather than the pipeline's.

        Returns:
            The context (a ``PipelineContext`` answering the same calls in a pipeline).

        Raises:
            ContextError: a bad count or KV type, or a cache that does not fit in memory.
        """
        if self.core is None:
            raise ModelError("this model has been closed")
        check_count("n_ctx", n_ctx)
        check_count("n_seq", n_seq)
        check_count("n_batch", n_batch)
        check_kv_type(kv_type)
        threads = cap_threads(check_threads(n_threads), stacklevel + 1)
        if threads is None:
            threads = self.n_threads
        n_batch = clamp_batch(n_batch, n_ctx, n_seq)
        # checked once the weights are in place: the repacked copy counts against the room;
        # offloaded layers keep their K/V on the device (which checks its own memory)
        host_layers = sum(last - first for backend, first, last in self.placement
                          if backend == "cpu")
        check_context_fits(self.hparams, n_ctx, n_batch, threads or available_cpus(), kv_type,
                           n_seq, host_layers=host_layers)
        warn_if_beyond_training(self.hparams, n_ctx, stacklevel + 1)
        core = core_module()
        what = f"n_ctx={n_ctx}" + (f" x {n_seq} sequences" if n_seq > 1 else "")
        if self.pipeline is not None and not _local:
            from pyllm.runtime.mpi_context import PipelineContext

            def local() -> Any:
                return self.new_context(n_ctx, n_batch=n_batch, n_threads=threads,
                                        kv_type=kv_type, n_seq=n_seq, stacklevel=stacklevel + 1,
                                        _local=True)

            kwargs = dict(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv_type=kv_type,
                          n_seq=n_seq)
            return PipelineContext(self.pipeline, self._pipeline_id, local, kwargs,
                                   n_vocab=self.n_vocab, n_layer=self.hparams.n_layer,
                                   layer_ranges=self.layer_ranges,
                                   header_bytes=int(core.STATE_HEADER_BYTES))
        try:
            return core.Context(self.core, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads or 0,
                                kv_type=core.KVType.__members__[kv_type], n_seq=n_seq)
        except ValueError as e:
            raise ModelError(f"{self.model_path}: cannot create a context of {what}: {e}") \
                from None
        except MemoryError:
            raise ContextError(f"out of memory allocating a context of {what}") from None

    def close(self) -> None:
        """Drop the weights and unmap the file (contexts made from it must be dropped first);
        in a pipeline, every rank's share."""
        if self.pipeline is not None and self.core is not None and not self.pipeline.closed:
            self.pipeline.command("unload", self._pipeline_id)
        if self.repack_writer is not None:
            self.repack_writer.finish()  # it reads the copies the core owns
        self.core = None
        if self._repack_image is not None:
            self._repack_image.close()
            self._repack_image = None
        self._reader.close()

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensors_table(reader: Any) -> list[list[Any]]:
    """Every tensor of a model file as ``[name, type name, dims, offset]``."""
    return [[t.name, t.type.name, list(t.dims), t.offset] for t in reader.tensors]


def model_identity(reader: Any) -> str:
    """SHA-256 (hex) of a model file's metadata and tensor table (no weights read)."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps(reader.metadata, sort_keys=True, default=_json_value).encode())
    for t in tensors_table(reader):
        h.update(json.dumps(t).encode())
    return h.hexdigest()


def _check_layer_range(n_layer: int, layer_range: tuple[int, int]) -> tuple[int, int]:
    first, last = layer_range
    if not 0 <= first < last <= n_layer:
        raise ModelError(f"layer_range {layer_range!r} must be (first, last) with "
                         f"0 <= first < last <= {n_layer}")
    return first, last


def shard_placement(placement: list[tuple[str, int, int]], n_layer: int,
                    layer_range: tuple[int, int]) -> list[tuple[str, int, int]]:
    """The placement of one process's share ``[first, last)`` of a model: the whole model's
    placement (empty: all on the CPU) cut to that range, the layers before and after it
    ``remote`` (another process's), the head here only where ``last`` is the layer count."""
    first, last = _check_layer_range(n_layer, layer_range)
    ranges = placement or [("cpu", 0, n_layer)]
    local = [(name, max(a, first), min(b, last)) for name, a, b in ranges
             if max(a, first) < min(b, last)]
    if last == n_layer and ranges[-1][1] == ranges[-1][2] == n_layer:
        local.append(ranges[-1])  # the head alone on its own backend
    before = [("remote", 0, first)] if first > 0 else []
    after = [("remote", last, n_layer)] if last < n_layer else []
    return [*before, *local, *after]


def shard_tensors(tensors: ModelTensors, n_layer: int,
                  layer_range: tuple[int, int]) -> ModelTensors:
    """Only the tensors one process's share of a model reads: its layers', the embeddings where
    it embeds (first layer) or they are the tied output (head), the head's where it has it."""
    first, last = _check_layer_range(n_layer, layer_range)
    head = last == n_layer
    keep = {"rope_freqs"}
    if head:
        keep |= {"output", "output_norm"}
    if first == 0 or (head and "output" not in tensors.model):
        keep.add("tok_embd")
    model = {slot: spec for slot, spec in tensors.model.items() if slot in keep}
    layers = [spec if first <= i < last else {} for i, spec in enumerate(tensors.layers)]
    return ModelTensors(model=model, layers=layers)


def _json_value(value: Any) -> Any:
    """json.dumps's fallback for the metadata values JSON lacks (arrays, numpy scalars, bytes)."""
    import numpy as np

    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def clamp_batch(n_batch: int, n_ctx: int, n_seq: int = 1) -> int:
    """The chunk size a context of ``n_seq`` x ``n_ctx`` positions uses for ``n_batch``: never
    more tokens than all its sequences can hold."""
    return min(n_batch, n_ctx * n_seq)
