"""The GPU backends (-DPYLLM_OPENCL=ON, -DPYLLM_CUDA=ON), each on the devices the machine has:
every test runs once per backend with a device (CI: OpenCL on PoCL's CPU device; CUDA where an
NVIDIA GPU is lent, bench/gpu_check.sh). Deselected where no backend has a device
(tests/conftest.py); .ci/run builds the GPU variant and runs these.

References: the numpy float64 forward (tests/reference) for every weight type, RoPE style and
bias layout; the CPU backend for the K/V cache types, batches of sequences and saved states; the
exact model (transformers) and the CPU's greedy text for SmolLM2 with all or half of its layers
offloaded. Measured on PoCL (2026-12-03): every type within 9.5e-6 (relative to the largest
logit) of the reference with an F32 cache (the CPU backend's quantized kernels: up to 3.5e-3);
SmolLM2 mean KL to transformers 3.0e-7 all offloaded, 5.4e-7 half (CPU: 7.0e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pyllm import DeviceError, LoadedModel, ModelError, _core
from pyllm.formats.gguf import GGMLType as T
from pyllm.runtime.devices import devices, plan_placement
from pyllm.runtime.llm import LLM
from tests.conftest import HANG_GUARD
from tests.reference import LlamaRef
from tests.tiny_models import TinySpec, write_tiny

pytestmark = pytest.mark.gpu

# the GPU backends of this build that have a device here (tests/conftest.py deselects this
# module when there is none)
KINDS = sorted({d.backend.partition(":")[0] for d in devices()} - {"cpu"})


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)

TOKENS = [1, 5, 77, 12, 130, 4, 9, 66, 3, 150, 21]
WEIGHT_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K,
                T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
REF_BOUND = 2e-5  # measured at most 9.5e-6 (Q5_K llama)


def _spec(wtype: T, arch: str = "llama") -> TinySpec:
    # 256-wide rows so that the k-quants (256-element super-blocks) fit every matrix
    return TinySpec(arch=arch, biases=arch == "qwen2", n_embd=256, n_head=8, n_head_kv=2,
                    n_ff=512, wtype=wtype, n_layer=2)


def _logits(model: LoadedModel, kv_type: str = "f32", tokens: list[int] = TOKENS,
            n_batch: int = 4) -> np.ndarray:
    ctx = _core.Context(model.core, n_ctx=32, n_batch=n_batch,
                        kv_type=_core.KVType.__members__[kv_type])
    return ctx.decode(np.array(tokens, np.int32), logits="all")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_devices_list_the_device(kind: str) -> None:
    found = [d for d in devices() if d.backend.startswith(f"{kind}:")]
    assert found and found[0].backend == f"{kind}:0" and found[0].memory > 0
    assert kind in _core.backends()
    out = subprocess.run([sys.executable, "-m", "pyllm", "info", "--devices"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    assert f"{kind}:0" in out and found[0].name in out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # adjacent / NeoX RoPE; qwen2 has biases
@pytest.mark.parametrize("wtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_every_weight_type_matches_the_float64_reference(tmp_path: Path, kind: str, wtype: T,
                                                         arch: str) -> None:
    path = write_tiny(tmp_path / "m.gguf", _spec(wtype, arch))
    want = LlamaRef(str(path)).forward(TOKENS)
    with LoadedModel(path, n_threads=2, n_gpu_layers=-1, device=kind) as m:
        assert m.core.placement == [(f"{kind}:0", 0, 2)]
        got = _logits(m)
    assert _rel(got, want) < REF_BOUND
    # negative control: the bound sees an error as small as the logits rounded to f16
    assert _rel(got.astype(np.float16).astype(np.float32), want) > REF_BOUND


@pytest.mark.parametrize("kv_type,bound", [("f16", 5e-4), ("q8_0", 1e-2)])
def test_kv_cache_types_store_what_the_cpu_stores(tmp_path: Path, kind: str, kv_type: str,
                                                  bound: float) -> None:
    """F32 weights (where the CPU is exact too): the cache's rounding is the only difference
    from the reference, and it must be the CPU's (measured: f16 4.5e-5, q8_0 2.1e-3)."""
    path = write_tiny(tmp_path / "m.gguf", _spec(T.F32))
    with LoadedModel(path, n_threads=2) as cpu, \
            LoadedModel(path, n_threads=2, n_gpu_layers=-1, device=kind) as ocl:
        want = _logits(cpu, kv_type)
        assert _rel(_logits(ocl, kv_type), want) < bound
        # negative control: another cache type is told apart
        other = "f16" if kv_type == "q8_0" else "q8_0"
        assert _rel(_logits(ocl, other), want) > bound


def test_sequences_in_one_batch_match_each_alone(tmp_path: Path, kind: str) -> None:
    """decode_batch with several sequences (the server's continuous batching) on the device:
    each sequence's logits as if it ran alone."""
    path = write_tiny(tmp_path / "m.gguf", _spec(T.Q4_K))
    seqs = [TOKENS[:4], TOKENS[4:9], TOKENS[9:]]
    with LoadedModel(path, n_threads=2, n_gpu_layers=-1, device=kind) as m:
        alone = [_logits(m, tokens=s) for s in seqs]
        ctx = _core.Context(m.core, n_ctx=16, n_batch=5, n_seq=3, kv_type=_core.KVType.f32)
        toks = np.array(sum(seqs, []), np.int32)
        ids = np.array(sum(([i] * len(s) for i, s in enumerate(seqs)), []), np.int32)
        out = ctx.decode_batch(toks, ids, np.ones(len(toks), np.uint8))
    np.testing.assert_allclose(out, np.concatenate(alone), rtol=0, atol=1e-5 * np.abs(out).max())


@pytest.mark.parametrize("n_gpu_layers", [-1, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "q8_0"], ids=["f32", "f16", "q8_0"])
def test_lora_adapters_on_offloaded_layers_match_the_cpu(tmp_path: Path, kind: str,
                                                          n_gpu_layers: int, dtype: type) -> None:
    """LoRA pairs (F32, F16 or a Q8_0 A, rank 12) and bias/norm deltas applied by the device
    stages: every
    layer offloaded, or one (the other and the head on the CPU), give the CPU's logits; two
    adapters at different scales, and in one batch sequences with different mixes each get
    their own."""
    from tests.test_lora import write_random_adapter

    # F32 weights: the CPU's quantized kernels round activations to int8 (~1e-3 apart), the
    # device's do not; in F32 both compute the exact model
    path = write_tiny(tmp_path / "m.gguf", _spec(T.F32, "qwen2"))
    pairs = write_random_adapter(tmp_path / "a.gguf", path, rank=12, std=0.1, dtype=dtype)
    deltas = write_random_adapter(tmp_path / "d.gguf", path, seed=3, deltas=True)
    lora = [(pairs, 0.8), (deltas, 0.6)]
    with LLM(path, n_ctx=32, kv_type="f32", lora=lora) as llm:
        want = llm.logits(TOKENS)
    with LLM(path, n_ctx=32, kv_type="f32") as llm:
        plain = llm.logits(TOKENS)
    with LLM(path, n_ctx=32, kv_type="f32", n_gpu_layers=n_gpu_layers, device=kind,
             lora=lora) as llm:
        got = llm.logits(TOKENS)
        # measured 8e-7 .. 5.3e-6 (PoCL); a Q8_0 A 1.9e-5 .. 5.4e-5: the CPU's AVX-512 VNNI
        # kernels round activations to int16 steps (csrc/cpu/matmul.h), the device's do not
        bound = 5e-4 if dtype == "q8_0" else 2e-5
        assert _rel(got, want) < bound
        assert _rel(plain, want) > 1e-2  # the adapters matter
        # one batch: sequence 0 with both adapters, 1 with the pairs at 0.3, 2 with none
        from pyllm.runtime.lora import AdapterSet

        adapters = AdapterSet(llm.model)
        mixes = [adapters.mix(lora), adapters.mix([(pairs, 0.3)]), []]
        ctx = llm.model.new_context(32, n_seq=3, kv_type="f32")
        ctx.set_lora_adapters(adapters.cores())
        for i, mix in enumerate(mixes):
            ctx.seq_set_lora(i, mix)
        toks = np.repeat(np.array(TOKENS[:6], np.int32), 3)
        seq = np.tile(np.arange(3, dtype=np.int32), 6)
        rows = np.zeros(len(toks), np.uint8)
        rows[-3:] = 1
        out = ctx.decode_batch(toks, seq, rows)
    for i, mix in enumerate([lora, [(pairs, 0.3)], None]):
        with LLM(path, n_ctx=32, kv_type="f32", lora=mix) as llm:
            alone = llm.logits(TOKENS[:6])[-1]
        assert _rel(out[i], alone) < bound, i  # measured 4e-7 .. 3.7e-6 (Q8_0 A: 3.3e-5)


def test_state_moves_between_the_device_and_the_cpu(tmp_path: Path, kind: str) -> None:
    path = write_tiny(tmp_path / "m.gguf", _spec(T.F32))
    with LoadedModel(path, n_threads=2) as cpu, \
            LoadedModel(path, n_threads=2, n_gpu_layers=1, device=kind) as half:
        assert half.core.placement == [("cpu", 0, 1), (f"{kind}:0", 1, 2), ("cpu", 2, 2)]
        a = _core.Context(half.core, n_ctx=32, kv_type=_core.KVType.f32)
        a.decode(np.array(TOKENS, np.int32), logits="last")
        b = _core.Context(cpu.core, n_ctx=32, kv_type=_core.KVType.f32)
        b.load_state(a.save_state())
        nxt = np.array([42], np.int32)
        moved, stayed = b.decode(nxt, logits="last"), a.decode(nxt, logits="last")
        whole = _core.Context(cpu.core, n_ctx=32, kv_type=_core.KVType.f32)
        want = whole.decode(np.array(TOKENS + [42], np.int32), logits="last")
        assert _rel(moved, want) < 1e-5 and _rel(stayed, want) < 1e-5
        # negative control: a state that lost its device rows does not continue the same way
        c = _core.Context(cpu.core, n_ctx=32, kv_type=_core.KVType.f32)
        c.decode(np.array(TOKENS[:1] * len(TOKENS), np.int32), logits="last")
        assert _rel(c.decode(nxt, logits="last"), want) > 1e-3


def test_placement_of_n_gpu_layers_follows_llama_cpp(kind: str) -> None:
    assert plan_placement(30, 0, kind) == []
    assert plan_placement(30, 10, kind) == [("cpu", 0, 20), (kind, 20, 30), ("cpu", 30, 30)]
    assert plan_placement(30, 30, kind) == [(kind, 0, 30), ("cpu", 30, 30)]
    assert plan_placement(30, 31, kind) == plan_placement(30, -1, kind) == [(kind, 0, 30)]
    assert plan_placement(30, -1, "cpu") == []
    # no device named: a GPU backend of this build that has a device
    assert plan_placement(30, -1, None)[0][0] in KINDS
    with pytest.raises(ModelError, match="n_gpu_layers"):
        plan_placement(30, -2, kind)


# what hides every device of a backend, and what it then says
NO_DEVICE = {"opencl": ("PYLLM_OPENCL_DEVICE", "no such device", "no OpenCL device found"),
             "cuda": ("CUDA_VISIBLE_DEVICES", "", "no CUDA device found")}


def test_devices_that_cannot_be_had_are_typed_errors(tmp_path: Path, kind: str) -> None:
    path = write_tiny(tmp_path / "m.gguf", _spec(T.Q8_0))
    for missing in {"cuda", "opencl"} - set(_core.backends()):  # a backend left out of the build
        flag = f"-DPYLLM_{missing.upper()}=ON"
        with pytest.raises(DeviceError, match=f"no {missing} backend.*{flag}"):
            LoadedModel(path, n_gpu_layers=-1, device=f"{missing}:0")
    with pytest.raises(DeviceError, match="device 9 does not exist"):
        LoadedModel(path, n_gpu_layers=-1, device=f"{kind}:9")
    # not enough device memory: the need and the room are named; without the limit the same
    # process then loads the model (nothing of the failed load stands in the way)
    code = ("import os, pyllm\n"
            f"try: pyllm.LoadedModel({str(path)!r}, n_gpu_layers=-1, device={kind!r})\n"
            "except pyllm.DeviceError as e: print(e)\n"
            "os.environ.pop('PYLLM_TEST_DEVICE_MEMORY', None)\n"
            f"m = pyllm.LoadedModel({str(path)!r}, n_gpu_layers=-1, device={kind!r})\n"
            "print('loaded', m.placement)\n")
    env = {**os.environ, "PYLLM_TEST_DEVICE_MEMORY": "4096"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    assert "need" in first and "but the device has 0 MiB" in first and "offload fewer" in first
    assert second == f"loaded [('{kind}:0', 0, 2)]"
    # no device: what hides them all is named
    var, value, message = NO_DEVICE[kind]
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, var: value},
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 1 and message in out.stdout


# ---- SmolLM2 end to end -------------------------------------------------------------------

PROMPTS = ["The three primary colours are", "To make a cup of tea, first",
           "The largest planet in our solar system is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def cpu_text(smollm2_path: Path) -> Iterator[dict[str, str]]:
    with LLM(smollm2_path, n_ctx=128, n_threads=2) as llm:
        yield {p: llm.generate(p, max_tokens=32, temperature=0) for p in PROMPTS}


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("n_gpu_layers", [-1, 15])
def test_smollm2_greedy_text_equals_the_cpu(smollm2_path: Path, cpu_text: dict[str, str],
                                            kind: str, n_gpu_layers: int) -> None:
    with LLM(smollm2_path, n_ctx=128, n_threads=2, n_gpu_layers=n_gpu_layers,
             device=kind) as llm:
        got = {p: llm.generate(p, max_tokens=32, temperature=0) for p in PROMPTS}
    assert got == cpu_text


@pytest.mark.slow
@pytest.mark.model
def test_cli_run_offloaded_prints_the_cpu_text(smollm2_path: Path, cpu_text: dict[str, str],
                                               kind: str) -> None:
    prompt = PROMPTS[0]
    cmd = [sys.executable, "-m", "pyllm", "run", "-m", str(smollm2_path), "-p", prompt, "-n", "32",
           "--temp", "0", "-c", "128"]
    out = subprocess.run([*cmd, "-ngl", "-1", "--device", kind], capture_output=True,
                         text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (prompt + cpu_text[prompt]).strip()
    bad = subprocess.run([*cmd, "-ngl", "-1", "--device", "tpu"], capture_output=True, text=True,
                         cwd="/")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "'tpu'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    flag = subprocess.run([*cmd, "-ngl", "-3"], capture_output=True, text=True, cwd="/")
    assert flag.returncode == 2 and "-ngl" in flag.stderr


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("n_gpu_layers", [-1, 15])
def test_smollm2_kl_to_the_exact_model_meets_the_cpu_bars(smollm2_path: Path, kind: str,
                                                          n_gpu_layers: int) -> None:
    """The CPU's bars of tests/test_kl.py (mean KL < 7e-6, max < 1.25e-4, at most one top-1
    flip in 512) over the same 512 tokens; the issue asked for < 1.5e-3."""
    import torch

    from tests.test_kl import N_TOKENS, TEXT, kl_stats, load_hf_model, within_bars

    model = load_hf_model(smollm2_path)
    with LLM(smollm2_path, n_ctx=N_TOKENS, n_threads=2, n_gpu_layers=n_gpu_layers,
             device=kind) as llm:
        tokens = llm.tokenize(TEXT.read_text(encoding="utf-8"), add_special=False)[:N_TOKENS]
        ours = llm.logits(tokens)
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].double().numpy()
    stats = kl_stats(want, ours)
    print(f"{kind} -ngl {n_gpu_layers}: mean KL {stats[0]:.2e}, max {stats[1]:.2e}, "
          f"top-1 {100 * stats[2]:.2f} %")
    assert within_bars(stats), stats


@pytest.mark.slow
@pytest.mark.model
def test_the_batching_engine_runs_offloaded_layers(smollm2_path: Path, cpu_text: dict[str, str],
                                                   kind: str) -> None:
    """The server's engine (continuous batching over 3 slots) on a model with every layer on
    the device: each of several concurrent greedy requests gets the CPU's text."""
    import threading

    from pyllm.runtime.sampling import SamplingParams
    from pyllm.server.engine import DoneEvent, Engine, Request, TokenEvent

    with LoadedModel(smollm2_path, n_threads=2, n_gpu_layers=-1, device=kind) as model:
        eng = Engine(model, n_parallel=3, n_ctx=128)
        try:
            texts = {p: "" for p in PROMPTS[:3]}
            done = {p: threading.Event() for p in texts}

            def collect(prompt: str) -> Callable[[object], None]:
                def on_event(ev: object) -> None:
                    if isinstance(ev, TokenEvent):
                        texts[prompt] += ev.text
                    elif isinstance(ev, DoneEvent):
                        done[prompt].set()
                return on_event

            for p in texts:
                ids = model.tokenizer.encode(p, add_special=True, parse_special=False)
                eng.submit(Request(ids, SamplingParams(temperature=0.0), collect(p), max_tokens=32))
            for p in texts:
                assert done[p].wait(HANG_GUARD), f"hung on {p!r}"
        finally:
            eng.stop()
    assert texts == {p: cpu_text[p] for p in texts}


def test_bench_reports_where_the_layers_ran(tmp_path: Path, kind: str) -> None:
    path = write_tiny(tmp_path / "m.gguf", _spec(T.Q4_0))
    cmd = [sys.executable, "-m", "pyllm", "bench", "-m", str(path), "-p", "8", "-n", "2", "-r", "1",
           "-o", "json"]
    rows = {}
    for ngl in ("-1", "1", "0"):
        out = subprocess.run([*cmd, "-ngl", ngl, "--device", kind], capture_output=True,
                             text=True, cwd="/")
        assert out.returncode == 0, out.stderr
        rows[ngl] = {(r["backend"], r["threads"] > 0) for r in json.loads(out.stdout)}
    assert rows == {"-1": {(f"{kind}:0", False)}, "1": {(f"cpu+{kind}:0", True)},
                    "0": {("cpu", True)}}


def test_the_host_memory_check_leaves_out_offloaded_caches(tmp_path: Path, kind: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A context's K/V cache of offloaded layers lives on the device: the host-memory check
    counts only the CPU's layers, so a context that fits the device is not refused for the
    host's room (and the same room still refuses an all-CPU context)."""
    from pyllm.errors import ContextError
    from pyllm.runtime import footprint

    path = write_tiny(tmp_path / "m.gguf", _spec(T.Q8_0))
    with LoadedModel(path, n_threads=2, n_gpu_layers=-1, device=kind) as gpu, \
            LoadedModel(path, n_threads=2) as cpu:
        hp = cpu.hparams
        n_ctx = hp.n_ctx_train  # chunks of n_ctx tokens (n_batch is clamped to it)
        room = footprint.context_bytes(hp, n_ctx, n_ctx, 2, host_layers=0)
        assert room < footprint.context_bytes(hp, n_ctx, n_ctx, 2)
        monkeypatch.setattr(footprint, "available_memory", lambda: room)
        assert gpu.new_context(n_ctx, n_threads=2).n_ctx == n_ctx
        with pytest.raises(ContextError, match="needs"):
            cpu.new_context(n_ctx, n_threads=2)


def test_importance_matrix_statistics_need_the_cpu(tmp_path: Path, kind: str) -> None:
    """pyllm imatrix collects matmul inputs in the CPU stage only: an offloaded layer is a clear
    DeviceError, nothing is collected, and the context still decodes."""
    path = write_tiny(tmp_path / "m.gguf", _spec(T.Q8_0))
    with LoadedModel(path, n_threads=2, n_gpu_layers=1, device=kind) as m:
        ctx = _core.Context(m.core, n_ctx=32, n_batch=4, kv_type=_core.KVType.f32)
        with pytest.raises(DeviceError, match="on the CPU only"):
            ctx.collect_activation_stats(True)
        assert not ctx.collecting_activation_stats and ctx.activation_stats() is None
        assert np.isfinite(ctx.decode(np.array(TOKENS[:3], np.int32), "all")).all()


def test_pipeline_shares_compose_with_offload(tmp_path: Path, kind: str) -> None:
    """The shares of a layer pipeline over MPI (each rank's layer_range) with -ngl: a share
    offloads its layers among the model's last N, the head goes with the last share; chained
    by hand as the ranks chain them, they give one process's logits with the same offload,
    and the CPU's within the device bound."""
    spec = _spec(T.F32)
    spec.n_layer = 4
    path = write_tiny(tmp_path / "m.gguf", spec)
    with LoadedModel(path, n_threads=2) as cpu, \
            LoadedModel(path, n_threads=2, n_gpu_layers=3, device=kind) as offloaded:
        on_cpu, whole = _logits(cpu), _logits(offloaded)
    shares = [LoadedModel(path, n_threads=2, layer_range=r, n_gpu_layers=3, device=kind)
              for r in ((0, 2), (2, 4))]
    assert shares[0].core.placement == [("cpu", 0, 1), (f"{kind}:0", 1, 2), ("remote", 2, 4)]
    assert shares[1].core.placement == [("remote", 0, 2), (f"{kind}:0", 2, 4), ("cpu", 4, 4)]
    ctxs = [_core.Context(m.core, n_ctx=32, n_batch=4, kv_type=_core.KVType.f32)
            for m in shares]
    toks = np.array(TOKENS, np.int32)
    seq, every = np.zeros(len(toks), np.int32), np.ones(len(toks), np.uint8)
    got = ctxs[1].decode_part(None, ctxs[0].decode_part(toks, None, seq, every), seq, every)
    np.testing.assert_array_equal(got, whole)
    assert _rel(got, on_cpu) < 1e-5
    del ctxs
    for m in shares:
        m.close()
