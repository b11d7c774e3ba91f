"""The device seam (csrc/backend/backend.h): a model's layers placed as ranges on backends at
load, each context running them as stages.

Only the CPU backend exists in this build, so these tests place the real SmolLM2 model's 30
layers in several CPU ranges and require exactly the logits, batched logits and saved state of
the one-range model: the context hands the hidden rows from stage to stage, each stage owns the
K/V rows of its layers, the head runs on the last. A stage that skipped, repeated or misnumbered
a layer, or a state that lost a stage's rows, would change these bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pyllm import LoadedModel, _core
from pyllm.errors import ModelError

PROMPT = [1, 504, 3458, 314, 2468, 30, 378, 1500, 288, 1072, 253, 1792, 28, 22, 9, 41, 77]


@pytest.fixture(scope="module")
def load(smollm2_path: Path) -> Iterator[object]:
    """Loads the model with a placement; every model loaded stays open until the module ends."""
    opened: list[LoadedModel] = []

    def _load(placement: list[tuple[str, int, int]]) -> object:
        opened.append(LoadedModel(smollm2_path, n_threads=2, placement=placement))
        return opened[-1].core

    yield _load
    for m in opened:
        m.close()


@pytest.fixture(scope="module")
def model(load: object) -> object:
    return load([])  # type: ignore[operator]


def _ranges(n_layer: int, cuts: list[int], head_alone: bool = False) -> list[tuple[str, int, int]]:
    bounds = [0, *cuts, n_layer]
    out = [("cpu", a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return out + ([("cpu", n_layer, n_layer)] if head_alone else [])


def _run(model: object, kv_type: object = None,
         n_batch: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """All-position logits of the prompt, then four greedy decode steps."""
    ctx = _core.Context(model, n_ctx=64, n_batch=n_batch, n_threads=2,
                        kv_type=kv_type or _core.DEFAULT_KV_TYPE)
    prompt = ctx.decode(np.array(PROMPT, np.int32), logits="all")
    steps, tok = [], int(prompt[-1].argmax())
    for _ in range(4):
        row = ctx.decode(np.array([tok], np.int32), logits="last")
        steps.append(row)
        tok = int(row.argmax())
    return prompt, steps


def test_default_placement_is_every_layer_and_the_head_on_the_cpu(model: object) -> None:
    assert "cpu" in _core.backends()
    assert model.placement == [("cpu", 0, model.n_layer)]
    assert _core.Context(model, n_ctx=16).placement == model.placement
    assert model.n_layer == 30


@pytest.mark.parametrize("cuts,head_alone,n_batch", [
    ([15], False, 512),
    ([1, 2, 29], True, 512),
    (list(range(1, 30)), False, 5),   # one stage per layer, prompt in chunks of 5
])
def test_split_placements_give_the_logits_of_one_stage_bit_for_bit(
        model: object, load: object, cuts: list[int], head_alone: bool, n_batch: int) -> None:
    base_prompt, base_steps = _run(model, n_batch=n_batch)
    split = load(_ranges(model.n_layer, cuts, head_alone))  # type: ignore[operator]
    assert split.placement == _ranges(30, cuts, head_alone)
    # the rows16 copies are made for the CPU's layers and its head, whatever the ranges
    assert split.repacked_bytes == model.repacked_bytes > 0
    prompt, steps = _run(split, n_batch=n_batch)
    np.testing.assert_array_equal(prompt, base_prompt)
    for got, want in zip(steps, base_steps, strict=True):
        np.testing.assert_array_equal(got, want)
    # negative control: the same comparison sees a change of one layer's K/V precision
    q8_prompt, _ = _run(split, kv_type=_core.KVType.q8_0, n_batch=n_batch)
    assert not np.array_equal(q8_prompt, base_prompt)


def test_split_placement_batches_several_sequences_like_one_stage(model: object,
                                                                 load: object) -> None:
    toks = np.array(PROMPT[:6] + PROMPT[6:12] + PROMPT[12:], np.int32)
    seqs = np.array([0] * 6 + [1] * 6 + [2] * (len(PROMPT) - 12), np.int32)
    want = np.ones(len(toks), np.uint8)
    out = []
    split = load(_ranges(model.n_layer, [7, 8, 20], head_alone=True))  # type: ignore[operator]
    for m in (model, split):
        ctx = _core.Context(m, n_ctx=32, n_batch=8, n_threads=2, n_seq=3)
        out.append(ctx.decode_batch(toks, seqs, want))
    np.testing.assert_array_equal(out[1], out[0])


def test_state_moves_between_differently_placed_contexts(model: object, load: object) -> None:
    """save_state writes the stages' rows in layer order, so the format does not depend on the
    placement: a state saved by a split context continues in a one-stage context exactly."""
    split = _core.Context(load(_ranges(model.n_layer, [3, 16], head_alone=True)),  # type: ignore[operator]
                          n_ctx=64, n_threads=2)
    split.decode(np.array(PROMPT, np.int32), logits="last")
    state = split.save_state()
    whole = _core.Context(model, n_ctx=64, n_threads=2)
    whole.load_state(state)
    assert whole.n_past == len(PROMPT)
    assert whole.save_state() == state
    nxt = np.array([PROMPT[3]], np.int32)
    np.testing.assert_array_equal(whole.decode(nxt, logits="last"),
                                  split.decode(nxt, logits="last"))
    # a state whose rows were cut short is refused, not half-loaded
    with pytest.raises(ValueError, match="size does not match"):
        whole.load_state(state[:-1])


@pytest.mark.parametrize("placement,message", [
    ([("cpu", 0, 10)], "covers layers 0..10 of the model's 30"),
    ([("cpu", 0, 10), ("cpu", 11, 30)], "must start at layer 10"),
    ([("cpu", 0, 20), ("cpu", 10, 30)], "must start at layer 20"),
    ([("cpu", 0, 31)], "at most at 30"),
    ([("cpu", 0, 10), ("cpu", 10, 10), ("cpu", 10, 30)], "only the last range may be empty"),
    ([("cpu", 0, 15), ("gpu0", 15, 30)], "this build has no backend 'gpu0'"),
    ([("cpu", 5, 30)], "must start at layer 0"),
])
def test_bad_placements_are_refused_with_the_reason(
        smollm2_path: Path, placement: list[tuple[str, int, int]], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        LoadedModel(smollm2_path, n_threads=1, placement=placement)


@pytest.mark.cpu_only_build
def test_a_build_without_a_gpu_backend_says_which_flag_adds_it(smollm2_path: Path) -> None:
    from pyllm import DeviceError, devices

    assert [d.backend for d in devices()] == ["cpu"]
    with pytest.raises(DeviceError, match="no GPU backend.*PYLLM_OPENCL=ON"):
        LoadedModel(smollm2_path, n_gpu_layers=-1)
    with pytest.raises(DeviceError, match="no opencl backend.*-DPYLLM_OPENCL=ON"):
        LoadedModel(smollm2_path, n_gpu_layers=4, device="opencl:0")
    with pytest.raises(ModelError, match="no backend 'opencl'.*PYLLM_OPENCL=ON"):
        LoadedModel(smollm2_path, placement=[("opencl", 0, 30)])


@pytest.mark.cuda_no_device
def test_a_cuda_build_without_a_gpu_says_so(smollm2_path: Path) -> None:
    """CI builds the CUDA variant on machines without an NVIDIA GPU: it imports, lists no CUDA
    device and refuses cleanly, in Python and on the command line."""
    import subprocess
    import sys

    from pyllm import DeviceError, devices

    assert "cuda" in _core.backends()
    assert not [d for d in devices() if d.backend.startswith("cuda")]
    with pytest.raises(DeviceError, match="no CUDA device found"):
        LoadedModel(smollm2_path, n_gpu_layers=-1, device="cuda")
    out = subprocess.run([sys.executable, "-m", "pyllm", "run", "-m", str(smollm2_path), "-p", "x",
                          "-ngl", "-1", "--device", "cuda:0"], capture_output=True, text=True,
                         cwd="/")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: ") and "no CUDA device found" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
