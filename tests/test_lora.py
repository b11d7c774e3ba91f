"""LoRA adapters: PEFT folders converted to GGUF adapters (pyllm/tools/convert/lora.py), read and
checked (pyllm/formats/lora.py) and baked into a base model (pyllm/tools/export_lora.py). The
reference is transformers + peft on the same random tiny models: a Llama (q/k rows permuted in
GGUF) and a Qwen2 (q/k/v biases, NeoX RoPE), rank 8, alpha 16, all seven block matrices, B not
zero."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import peft
import pytest
import torch

from pyllm.errors import ConvertError, GGUFError, ModelError
from pyllm.formats.gguf import GGMLType, GGUFReader, GGUFWriter
from pyllm.formats.lora import read_adapter
from pyllm.tools.convert import convert_hf
from pyllm.tools.convert.lora import convert_lora
from pyllm.tools.export_lora import export_lora
from tests.reference import LlamaRef
from tests.test_cli import run_cli
from tests.test_convert_hf import hf_logits, make_model, tokens

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {"llama": ("Llama", {}), "qwen2": ("Qwen2", {})}


def make_peft(kind: str, overrides: dict[str, Any], **lora: Any) -> Any:
    """The tiny model with a LoRA on all seven matrices; A and B random (B is zero when PEFT
    initialises it, which would test nothing)."""
    base = make_model(kind, overrides)
    config = peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS,
                                "lora_dropout": 0.0, **lora})
    model = peft.get_peft_model(base, config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def scaled(model: Any, scale: float) -> Any:
    """A copy whose LoRA contributes ``scale`` times as much (B scaled)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Any]:
    kind, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base_dir = root / "base"
    make_model(kind, overrides).save_pretrained(base_dir)
    model = make_peft(kind, overrides)
    model.save_pretrained(root / "adapter")
    base_gguf = convert_hf(base_dir, root / "base.gguf", "f32", progress=False)
    return {"name": request.param, "kind": kind, "overrides": overrides, "root": root,
            "base_dir": base_dir, "base_gguf": base_gguf, "adapter_dir": root / "adapter",
            "model": model}


def test_converted_adapter_has_llama_cpp_layout(case: dict[str, Any]) -> None:
    out = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf", "f32",
                       progress=False)
    with GGUFReader(out) as r:
        md = r.metadata
        assert md["general.type"] == "adapter" and md["adapter.type"] == "lora"
        assert md["adapter.lora.alpha"] == 16.0
        assert md["general.architecture"] == case["name"]
        names = {t.name: t.shape for t in r}
    assert len(names) == 2 * 7 * 2  # two blocks, seven matrices, A and B
    assert names["blk.0.attn_q.weight.lora_a"] == (8, 64)
    assert names["blk.1.ffn_down.weight.lora_b"] == (64, 8)
    adapter = read_adapter(out)
    assert set(adapter.pairs) == {f"blk.{i}.{m}.weight" for i in range(2) for m in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert adapter.factor("blk.0.attn_q.weight") == 2.0  # alpha 16 / rank 8
    # a .bin adapter (torch.load with weights_only) converts to the same tensors
    binary = case["root"] / "adapter-bin"
    case["model"].save_pretrained(binary, safe_serialization=False)
    assert (binary / "adapter_model.bin").is_file()
    from_bin = read_adapter(convert_lora(binary, case["base_gguf"], case["root"] / "bin.gguf",
                                         "f32", progress=False))
    for name, pair in adapter.pairs.items():
        assert np.array_equal(from_bin.pairs[name].b, pair.b), name
    # the same adapter from the Hugging Face folder of the base (no GGUF needed)
    again = convert_lora(case["adapter_dir"], case["base_dir"], case["root"] / "b.gguf", "f32",
                         progress=False)
    assert read_adapter(again).pairs.keys() == adapter.pairs.keys()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_logits_match_peft(case: dict[str, Any], scale: float) -> None:
    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf",
                           "f32", progress=False)
    merged = export_lora(case["base_gguf"], [(adapter, scale)],
                         case["root"] / f"merged-{scale}.gguf")
    toks = tokens()
    want = hf_logits(scaled(case["model"], scale), toks)
    got = LlamaRef(str(merged)).forward(toks)
    base = LlamaRef(str(case["base_gguf"])).forward(toks)
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(base - want).max() > 0.1  # negative control: the adapter changes the logits


def test_q_k_rows_follow_the_model_converter(case: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """llama files permute q/k rows and qwen2 files keep HF's order (NeoX RoPE): an adapter
    written the other way gives other logits, so the parity above checks the rows."""
    import pyllm.tools.convert.lora as conv

    flipped = conv.PERMUTED_QK_ARCHS ^ {case["name"]}
    monkeypatch.setattr(conv, "PERMUTED_QK_ARCHS", flipped)
    bad = convert_lora(case["adapter_dir"], case["base_gguf"], tmp_path / "bad.gguf", "f32",
                       progress=False)
    merged = export_lora(case["base_gguf"], [bad], tmp_path / "m.gguf")
    toks = tokens()
    assert np.abs(LlamaRef(str(merged)).forward(toks) - hf_logits(case["model"], toks)
                  ).max() > 1e-2


def test_rslora_and_patterns_fold_into_b(tmp_path: Path) -> None:
    """rsLoRA (alpha / sqrt(r)) and per-module ranks and alphas: one alpha in the file, the
    rest folded into B, same logits as peft."""
    model = make_peft("Llama", {}, use_rslora=True, rank_pattern={"v_proj": 4},
                      alpha_pattern={"down_proj": 4})
    make_model("Llama", {}).save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    base = convert_hf(tmp_path / "base", tmp_path / "base.gguf", "f32", progress=False)
    adapter = convert_lora(tmp_path / "adapter", base, tmp_path / "a.gguf", "f32",
                           progress=False)
    assert read_adapter(adapter).pairs["blk.0.attn_v.weight"].rank == 4
    merged = export_lora(base, [adapter], tmp_path / "m.gguf")
    toks = tokens()
    assert np.abs(LlamaRef(str(merged)).forward(toks) - hf_logits(model, toks)).max() < 1e-3


def test_two_adapters_and_quantized_types(case: dict[str, Any], tmp_path: Path) -> None:
    """Two adapters add up; export into q8_0 stays close; a q8_0/f16 adapter file too."""
    a = convert_lora(case["adapter_dir"], case["base_gguf"], tmp_path / "a.gguf", "f32",
                     progress=False)
    half = convert_lora(case["adapter_dir"], case["base_gguf"], tmp_path / "h.gguf", "f16",
                        progress=False)
    with GGUFReader(half) as r:
        assert {t.type for t in r} == {GGMLType.F16}
    both = export_lora(case["base_gguf"], [(a, 0.25), (a, 0.25)], tmp_path / "both.gguf")
    one = export_lora(case["base_gguf"], [(a, 0.5)], tmp_path / "one.gguf")
    toks = tokens()
    assert np.abs(LlamaRef(str(both)).forward(toks) - LlamaRef(str(one)).forward(toks)
                  ).max() < 1e-4
    # into q8_0: each adapted matrix is the q8_0 encoding of the float merge, bit for bit
    from pyllm.formats import qtypes

    f32 = export_lora(case["base_gguf"], [a], tmp_path / "f32.gguf")
    q8 = export_lora(case["base_gguf"], [a], tmp_path / "q8.gguf", "q8_0")
    with GGUFReader(q8) as r, GGUFReader(f32) as ref, GGUFReader(case["base_gguf"]) as base:
        for t in r:
            if t.name.endswith(("attn_q.weight", "ffn_down.weight")):
                assert t.type == GGMLType.Q8_0
                want = qtypes.quantize(GGMLType.Q8_0, ref.tensor(t.name).data)
                assert np.array_equal(t.raw, want.reshape(-1)), t.name
            elif t.name.endswith("norm.weight"):  # not adapted: copied byte for byte
                assert t.type == GGMLType.F32
                assert np.array_equal(t.raw, base.tensor(t.name).raw)


# ---- bad input ------------------------------------------------------------------------------

def _adapter_folder(case: dict[str, Any], tmp_path: Path, **config: Any) -> Path:
    src = tmp_path / "adapter"
    src.mkdir()
    for f in case["adapter_dir"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize(("config", "message"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_alpha": None}, "lora_alpha must be a positive number"),
    ({"bias": "all"}, "trained biases"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"r": 4}, "adapter_config.json says 4"),
])
def test_bad_peft_configs(case: dict[str, Any], tmp_path: Path, config: dict[str, Any],
                          message: str) -> None:
    src = _adapter_folder(case, tmp_path, **config)
    with pytest.raises(ConvertError, match=message):
        convert_lora(src, case["base_gguf"], tmp_path / "a.gguf", progress=False)
    assert not (tmp_path / "a.gguf").exists()


def test_adapter_for_another_base_is_refused(case: dict[str, Any], tmp_path: Path) -> None:
    kind, overrides = CASES[case["name"]]
    other = make_model(kind, {**overrides, "intermediate_size": 128})
    other.save_pretrained(tmp_path / "other")
    other_gguf = convert_hf(tmp_path / "other", tmp_path / "other.gguf", "f32", progress=False)
    with pytest.raises(ConvertError, match=r"mlp\.down_proj: blk\.0\.ffn_down\.weight is "
                                           r"\[64, 128\] in the base model, the adapter's "
                                           r"B @ A is \[64, 96\]: an adapter for another"):
        convert_lora(case["adapter_dir"], other_gguf, tmp_path / "a.gguf", progress=False)
    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], tmp_path / "a.gguf",
                           progress=False)
    with pytest.raises(ModelError, match=r"ffn_down\.weight is 64 x 128 in the model"):
        export_lora(other_gguf, [adapter], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_adapter_files(case: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not an adapter file"):
        read_adapter(case["base_gguf"])  # a model, not an adapter
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(GGUFError):
        read_adapter(junk)
    def adapter_file(name: str, tensors: dict[str, tuple[int, int]], alpha: bool = True
                     ) -> Path:
        w = GGUFWriter(tmp_path / name)
        w.add_kv("general.architecture", case["name"])
        w.add_kv("general.type", "adapter")
        w.add_kv("adapter.type", "lora")
        if alpha:
            w.add_kv("adapter.lora.alpha", 16.0)
        for tensor, shape in tensors.items():
            w.add_tensor(tensor, np.zeros(shape, np.float32))
        w.write()
        return tmp_path / name

    half = adapter_file("half.gguf", {"blk.0.attn_q.weight.lora_a": (8, 64)})
    with pytest.raises(ModelError, match=r"blk\.0\.attn_q\.weight\.lora_b is missing"):
        read_adapter(half)
    no_alpha = adapter_file("noalpha.gguf", {"blk.0.attn_q.weight.lora_a": (8, 64),
                                             "blk.0.attn_q.weight.lora_b": (64, 8)}, alpha=False)
    with pytest.raises(ModelError, match="lacks a positive adapter.lora.alpha"):
        read_adapter(no_alpha)
    embed = adapter_file("embed.gguf", {"token_embd.weight.lora_a": (8, 64),
                                        "token_embd.weight.lora_b": (320, 8)})
    with pytest.raises(ModelError, match="token_embd.weight cannot be adapted"):
        export_lora(case["base_gguf"], [embed], tmp_path / "m.gguf")


def test_cli_convert_and_export(case: dict[str, Any], tmp_path: Path) -> None:
    a = tmp_path / "a.gguf"
    r = run_cli("convert-lora", str(case["adapter_dir"]), "--base", str(case["base_gguf"]),
                "-o", str(a), "--outtype", "f32", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {a}" in r.stdout
    m = tmp_path / "m.gguf"
    r = run_cli("export-lora", str(case["base_gguf"]), "--lora-scaled", str(a), "0.5", "-o",
                str(m), timeout=300)
    assert r.returncode == 0, r.stderr
    toks = tokens()
    assert np.abs(LlamaRef(str(m)).forward(toks) - hf_logits(scaled(case["model"], 0.5), toks)
                  ).max() < 1e-3
    r = run_cli("export-lora", str(case["base_gguf"]), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "give at least one adapter" in r.stderr
    r = run_cli("export-lora", str(case["base_gguf"]), "--lora-scaled", str(a), "half", "-o",
                str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "expected a number" in r.stderr
    r = run_cli("convert-lora", str(tmp_path), "--base", str(case["base_gguf"]), "-o",
                str(tmp_path / "y.gguf"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and \
        "no adapter_config.json" in r.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


# ---- applied at run time --------------------------------------------------------------------

def _runtime_logits(path: Path, toks: np.ndarray, lora: Any = None) -> np.ndarray:
    from pyllm.runtime.llm import LLM

    # an F32 KV cache: the F16 one's rounding alone moves these random models' logits by ~0.02
    with LLM(path, n_ctx=128, lora=lora, kv_type="f32") as llm:
        return llm.logits(toks).astype(np.float64)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_runtime_adapter_matches_peft(case: dict[str, Any], scale: float) -> None:
    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf",
                           "f32", progress=False)
    toks = tokens()
    want = hf_logits(scaled(case["model"], scale), toks)
    got = _runtime_logits(case["base_gguf"], toks, [(adapter, scale)])
    assert np.abs(got - want).max() < 1e-3
    # the same as the merged file run by the same runtime
    merged = export_lora(case["base_gguf"], [(adapter, scale)],
                         case["root"] / f"rt-merged-{scale}.gguf")
    assert np.abs(got - _runtime_logits(merged, toks)).max() < 1e-3
    assert np.abs(_runtime_logits(case["base_gguf"], toks) - want).max() > 0.1  # control


def test_set_lora_switches_without_reloading(case: dict[str, Any]) -> None:
    from pyllm.runtime.llm import LLM

    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf",
                           "f32", progress=False)
    toks = tokens()
    base = _runtime_logits(case["base_gguf"], toks)
    with LLM(case["base_gguf"], n_ctx=128, kv_type="f32") as llm:
        first = llm.eval(toks[:8].tolist())
        assert np.abs(first - base[7]).max() < 1e-4
        llm.set_lora([adapter])
        assert llm.n_past == 0  # the cached positions were computed without it
        assert llm.lora == [(Path(adapter), 1.0)]
        adapted = llm.logits(toks)
        assert np.abs(adapted - hf_logits(case["model"], toks)).max() < 1e-3
        llm.set_lora([(adapter, 0.25), (adapter, 0.25)])  # the same file twice adds up
        assert np.abs(llm.logits(toks) - _runtime_logits(
            case["base_gguf"], toks, [(adapter, 0.5)])).max() < 1e-4
        llm.set_lora(None)
        assert np.abs(llm.logits(toks) - base).max() < 1e-4


def test_sequences_with_different_adapters_share_a_batch(case: dict[str, Any]) -> None:
    """One forward, two sequences: one with the adapter, one without; each gets its own
    logits (the context applies each token's sequence's mix)."""
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.lora import AdapterSet

    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf",
                           "f32", progress=False)
    toks = tokens()[:16]
    with LLM(case["base_gguf"], n_ctx=64) as llm:
        ctx = llm.model.new_context(64, n_seq=2, kv_type="f32")
        adapters = AdapterSet(llm.model)
        mix = adapters.mix([(Path(adapter), 1.0)])
        ctx.set_lora_adapters(adapters.cores())
        ctx.seq_set_lora(0, mix)
        both = np.r_[toks, toks].astype(np.int32)
        seq = np.r_[np.zeros(16), np.ones(16)].astype(np.int32)
        want = np.zeros(32, np.uint8)
        want[[15, 31]] = 1
        rows = ctx.decode_batch(both, seq, want)
    adapted = _runtime_logits(case["base_gguf"], toks, [adapter])[-1]
    plain = _runtime_logits(case["base_gguf"], toks)[-1]
    assert np.abs(rows[0] - adapted).max() < 1e-4
    assert np.abs(rows[1] - plain).max() < 1e-4
    assert np.abs(adapted - plain).max() > 0.1


def test_runtime_refusals(case: dict[str, Any], tmp_path: Path) -> None:
    from pyllm.runtime.llm import LLM

    kind, overrides = CASES[case["name"]]
    other = make_model(kind, {**overrides, "intermediate_size": 128})
    make_peft(kind, {**overrides, "intermediate_size": 128}).save_pretrained(tmp_path / "ad")
    other.save_pretrained(tmp_path / "other")
    other_gguf = convert_hf(tmp_path / "other", tmp_path / "other.gguf", "f32", progress=False)
    foreign = convert_lora(tmp_path / "ad", other_gguf, tmp_path / "f.gguf", "f32",
                           progress=False)
    with pytest.raises(ModelError, match=r"ffn_down\.weight is 64 x 96 in the model"):
        LLM(case["base_gguf"], n_ctx=64, lora=[foreign])
    with LLM(case["base_gguf"], n_ctx=64) as llm:
        llm.eval([1, 2, 3])
        with pytest.raises(ModelError, match="does not exist"):
            llm.set_lora([tmp_path / "missing.gguf"])
        assert llm.n_past == 3 and llm.lora == []  # nothing changed
        with pytest.raises(ModelError, match="must be a finite number"):
            llm.set_lora([(foreign, float("nan"))])


def write_random_adapter(path: Path, base: Path, rank: int = 8, seed: int = 0,
                         std: float = 0.05, dtype: Any = np.float32, deltas: bool = False,
                         pairs: bool = True) -> Path:
    """A random adapter on the seven matrices of every block of ``base`` (a GGUF model), its
    tensors stored as ``dtype`` (float32 or float16); ``deltas``: also pyllm's bias/norm deltas
    (both norms of each block, the output norm, a bias for each of the seven matrices)."""
    rng = np.random.default_rng(seed)
    with GGUFReader(base) as r:
        arch = r.metadata["general.architecture"]
        shapes = {t.name: t.shape for t in r}
    w = GGUFWriter(path)
    w.add_kv("general.architecture", arch)
    w.add_kv("general.type", "adapter")
    w.add_kv("adapter.type", "lora")
    w.add_kv("adapter.lora.alpha", float(2 * rank))
    for name, shape in shapes.items():
        if name.endswith(".weight") and name.split(".")[-2] in (
                "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            n_out, n_in = shape
            if pairs:
                a = rng.normal(0, std, (rank, n_in))
                b = rng.normal(0, std, (n_out, rank))
                if dtype == "q8_0" and n_in % 32:  # as convert-lora: no whole blocks, F16
                    w.add_tensor(name + ".lora_a", a.astype(np.float16))
                    w.add_tensor(name + ".lora_b", b.astype(np.float16))
                elif dtype == "q8_0":  # convert-lora's q8_0: A in Q8_0, B (rank columns) F16
                    from pyllm.formats import qtypes

                    w.add_tensor(name + ".lora_a", qtypes.quantize(GGMLType.Q8_0,
                                                                   a.astype(np.float32)),
                                 GGMLType.Q8_0, [n_in, rank])
                    w.add_tensor(name + ".lora_b", b.astype(np.float16))
                else:
                    w.add_tensor(name + ".lora_a", a.astype(dtype))
                    w.add_tensor(name + ".lora_b", b.astype(dtype))
            if deltas:
                bias = name.removesuffix(".weight") + ".bias.delta"
                w.add_tensor(bias, rng.normal(0, 0.3, n_out).astype(np.float32))
        elif deltas and name.endswith("norm.weight"):
            w.add_tensor(name + ".delta", rng.normal(0, 0.3, shape).astype(np.float32))
    w.write()
    return path


def test_cli_lora_flags_on_smollm2(smollm2_path: Path, tmp_path: Path) -> None:
    from pyllm.runtime.llm import LLM

    adapter = write_random_adapter(tmp_path / "smol-lora.gguf", smollm2_path)
    args = ("run", "-m", str(smollm2_path), "-p", "The capital of France is", "-n", "12",
            "--temp", "0")
    plain = run_cli(*args, timeout=300)
    with_lora = run_cli(*args, "--lora-scaled", str(adapter), "0.8", timeout=300)
    assert plain.returncode == 0 and with_lora.returncode == 0, with_lora.stderr
    assert plain.stdout != with_lora.stdout  # the adapter changes the text
    with LLM(smollm2_path, lora=[(adapter, 0.8)]) as llm:
        expected = llm.generate("The capital of France is", max_tokens=12, temperature=0)
    assert with_lora.stdout == "The capital of France is" + expected + "\n"
    bad = run_cli(*args, "--lora", str(tmp_path / "nope.gguf"))
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "does not exist" in \
        bad.stderr
    bad = run_cli(*args, "--lora-scaled", str(adapter), "x")
    assert bad.returncode == 2 and "expected a number" in bad.stderr


def test_cli_perplexity_with_an_adapter(smollm2_path: Path, tmp_path: Path) -> None:
    import re

    from pyllm.runtime.llm import LLM
    from pyllm.tools import perplexity as pp

    adapter = write_random_adapter(tmp_path / "a.gguf", smollm2_path, std=0.05)
    text = tmp_path / "t.txt"
    text.write_text("The sun rose over the quiet village, and the children ran to the river. "
                    * 12)
    args = ("perplexity", "-m", str(smollm2_path), "-f", str(text), "-c", "64")
    plain, adapted = run_cli(*args, timeout=300), run_cli(*args, "--lora", str(adapter),
                                                          timeout=300)
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr

    def ppl(out: str) -> float:
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
        assert m, out
        return float(m.group(1))

    with LLM(smollm2_path, n_ctx=64, lora=[adapter]) as llm:
        want = pp.perplexity(llm, pp.tokenize_text(llm, text.read_text()), 64).ppl
    assert ppl(adapted.stdout) == pytest.approx(want, rel=1e-4)
    assert abs(ppl(adapted.stdout) - ppl(plain.stdout)) > 1e-3 * ppl(plain.stdout)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "q8_0"], ids=["f32", "f16", "q8_0"])
def test_runtime_adapter_on_every_isa(tmp_path: Path, dtype: Any) -> None:
    """The low-rank terms (the A product through the matmul kernels, B through
    OpsTable::lowrank_add over 16-row blocks) on every ISA of this machine, with row counts
    that leave a partial block (n_ff 100, kv rows 40), against the float64 reference of the
    merged model. A Q8_0 A (convert-lora --outtype q8_0) is kept in Q8_0: the pairs take
    fewer bytes than in F16."""
    from pyllm import _core as core
    from pyllm.runtime.llm import LLM
    from tests.tiny_models import TinySpec, write_tiny

    base = write_tiny(tmp_path / "m.gguf", TinySpec(n_embd=96, n_head=4, n_head_kv=2, n_ff=100))
    adapter = write_random_adapter(tmp_path / "a.gguf", base, rank=12, std=0.2, dtype=dtype)
    if dtype == "q8_0":
        from pyllm.runtime.loaded import LoadedModel
        from pyllm.runtime.lora import load_adapter

        f16 = write_random_adapter(tmp_path / "h.gguf", base, rank=12, dtype=np.float16)
        with LoadedModel(base) as m:
            sizes = [load_adapter(m, p).core.nbytes for p in (adapter, f16)]
        # A in Q8_0 (34 bytes per 32) beside F16 (64): measured 10560 against 13392
        assert sizes[0] < 0.8 * sizes[1], sizes
    merged = export_lora(base, [(adapter, 0.7)], tmp_path / "merged.gguf")
    toks = [1, 5, 77, 12, 130, 4, 9, 66, 3, 150, 21]
    want = LlamaRef(str(merged)).forward(np.array(toks))
    plain = LlamaRef(str(base)).forward(np.array(toks))
    before = core.active_isa()
    try:
        for isa in core.available_isas():
            core.set_active_isa(isa)
            with LLM(base, n_ctx=32, kv_type="f32", lora=[(adapter, 0.7)]) as llm:
                got = llm.logits(toks)
            rel = np.abs(got - want).max() / np.abs(want).max()
            # measured 7.7e-7 .. 2.8e-6; Q8_0 A on AVX-512 VNNI 1.3e-4: those kernels round
            # activations to int16 steps (csrc/cpu/matmul.h), as for a Q8_0 base matrix
            bound = 5e-4 if dtype == "q8_0" and isa == "avx512" else 1e-5
            assert rel < bound, (isa, rel)
    finally:
        core.set_active_isa(before)
    assert np.abs(plain - want).max() / np.abs(want).max() > 1e-2  # the adapter matters


# ---- llama.cpp reads our adapters as we do ---------------------------------------------------

LORA_FIGURES = Path(__file__).parent / "data" / "llamacpp_lora_figures.json"
LLAMACPP_LORA = Path(__file__).parent / "data" / "llamacpp_lora"
LORA_PROMPT = [1, 504, 3458, 282, 4649, 314]


def lora_figure_inputs(folder: Path) -> tuple[Path, Path]:
    """The inputs of tests/data/make_llamacpp_lora_figures.py: SmolLM2 requantized to F32 and
    a random F32 adapter for it (both deterministic)."""
    from pyllm.runtime.default_model import resolve_model_path
    from pyllm.tools.quantize import quantize_file

    base = folder / "smollm2-f32.gguf"
    quantize_file(resolve_model_path(None), base, "F32", allow_requantize=True, progress=False)
    return base, write_random_adapter(folder / "adapter.gguf", base, rank=8, seed=3, std=0.02)


def test_llama_cpp_applies_our_adapter_as_we_do(smollm2_path: Path, tmp_path: Path) -> None:
    """llama.cpp (llama-cpp-python's lora_path, figures checked in with the command that made
    them) gives the logits pyllm gives with the same adapter: within the base's own distance
    (both F32; measured 0.0089 base, 0.012 with the adapter, whose effect is ~80 in norm)."""
    from pyllm.runtime.llm import LLM

    figures = json.loads(LORA_FIGURES.read_text(encoding="utf-8"))
    base, adapter = lora_figure_inputs(tmp_path)
    got = {}
    for name, lora in (("base", None), ("lora", [adapter])):
        with LLM(base, n_ctx=64, kv_type="f32", lora=lora) as llm:
            got[name] = llm.logits(LORA_PROMPT)[-1].astype(np.float64)
    for name in ("base", "lora"):
        ids = np.array(figures[name]["ids"])
        want = np.array(figures[name]["logits"])
        assert np.abs(got[name][ids] - want).max() < 0.03, name
        assert got[name].argmax() == ids[0]
    # negative control: the adapter moves these logits far more than the two runtimes differ
    ids = np.array(figures["lora"]["ids"])
    assert np.abs(got["base"][ids] - np.array(figures["lora"]["logits"])).max() > 0.5


def test_a_saved_state_loads_only_under_its_adapters(case: dict[str, Any]) -> None:
    from pyllm.errors import ContextError
    from pyllm.runtime.llm import LLM

    adapter = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "a.gguf",
                           "f32", progress=False)
    with LLM(case["base_gguf"], n_ctx=64, kv_type="f32", lora=[adapter]) as llm:
        llm.eval([1, 2, 3, 4])
        state = llm.save_state()
        after = llm.eval([5])
        llm.set_lora(None)
        with pytest.raises(ContextError, match="computed with LoRA adapters"):
            llm.load_state(state)
        llm.set_lora([adapter])
        llm.load_state(state)
        assert np.array_equal(llm.eval([5]), after)


def test_pyllm_loads_llama_cpp_converter_output(case: dict[str, Any]) -> None:
    """llama.cpp's convert_lora_to_gguf.py output for this case's PEFT folder (checked in with
    tests/data/make_llamacpp_lora_golden.py, the command that made it): pyllm reads it, its
    tensors are bit for bit what pyllm's converter writes (q/k rows permuted alike, the same F16
    rounding), and the logits with it equal transformers + peft's as pyllm's own adapter does."""
    golden = LLAMACPP_LORA / f"{case['name']}.gguf"
    ours = convert_lora(case["adapter_dir"], case["base_gguf"], case["root"] / "ours16.gguf",
                        "f16", progress=False)
    theirs = read_adapter(golden)
    assert theirs.alpha == 16.0
    with GGUFReader(golden) as a, GGUFReader(ours) as b:
        assert a.get("general.type") == "adapter" and a.get("adapter.type") == "lora"
        assert sorted(t.name for t in a) == sorted(t.name for t in b)
        for t in a:
            assert t.type == GGMLType.F16 and t.shape == b.tensor(t.name).shape, t.name
            assert np.array_equal(t.data, b.tensor(t.name).data), (
                f"{t.name} differs from pyllm's conversion: if torch's random streams changed, "
                "regenerate with tests/data/make_llamacpp_lora_golden.py")
    model = copy.deepcopy(case["model"])  # the reference with the file's F16 A and B
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.half().float())
    toks = tokens()
    want = hf_logits(model, toks)
    got = _runtime_logits(case["base_gguf"], toks, [golden])
    assert np.abs(got - want).max() < 2e-4  # measured 3e-5 (llama), 4e-5 (qwen2)
    assert np.array_equal(got, _runtime_logits(case["base_gguf"], toks, [ours]))
    plain = _runtime_logits(case["base_gguf"], toks)
    assert np.abs(plain - want).max() > 1.0  # the adapter matters (measured ~12)


# ---- bias and norm deltas (LLaMA2-Accessory's tuning) at run time ----------------------------

@pytest.fixture(scope="module")
def delta_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen2-shaped model (q/k/v biases of its own, so deltas add to existing biases and
    make new ones for o/gate/up/down), an adapter with pairs and deltas, and one with deltas
    only."""
    from tests.tiny_models import TinySpec, write_tiny

    root = tmp_path_factory.mktemp("deltas")
    base = write_tiny(root / "m.gguf", TinySpec(arch="qwen2", n_embd=80, n_head=4, n_head_kv=2,
                                                n_ff=100, biases=True))
    return {"base": base,
            "both": write_random_adapter(root / "both.gguf", base, rank=8, std=0.2, seed=4,
                                         deltas=True),
            "deltas": write_random_adapter(root / "d.gguf", base, seed=5, deltas=True,
                                           pairs=False),
            "root": root}


@pytest.mark.parametrize("which,scale", [("both", 0.7), ("deltas", 1.0), ("deltas", -0.5)])
def test_runtime_deltas_equal_the_merged_model(delta_model: dict[str, Path], which: str,
                                               scale: float) -> None:
    """Norm deltas (both block norms and the output norm) and bias deltas (added to the base's
    q/k/v biases, new ones for o/gate/up/down) applied at run time give the logits of the model
    export-lora writes with them merged, by the float64 reference."""
    from pyllm.runtime.llm import LLM

    base, adapter = delta_model["base"], delta_model[which]
    merged = export_lora(base, [(adapter, scale)], delta_model["root"] / f"m-{which}-{scale}.gguf")
    toks = [1, 5, 77, 12, 130, 4, 9, 66, 3, 150, 21]
    want = LlamaRef(str(merged)).forward(np.array(toks))
    with LLM(base, n_ctx=32, kv_type="f32", lora=[(adapter, scale)]) as llm:
        got = llm.logits(toks)
        emb = llm.embed(toks)
    with LLM(merged, n_ctx=32, kv_type="f32") as llm:
        emb_merged = llm.embed(toks)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel  # measured 6e-7 .. 2.1e-6
    # the output norm's delta reaches embeddings too (measured 4e-7)
    assert np.abs(emb - emb_merged).max() < 2e-6
    plain = LlamaRef(str(base)).forward(np.array(toks))
    assert np.abs(plain - want).max() / np.abs(want).max() > 1e-2  # the deltas matter


def test_sequences_with_different_deltas_share_a_batch(delta_model: dict[str, Path]) -> None:
    """Three sequences in one forward, interleaved token by token: the deltas at scale 1, at
    0.5, and none; each sequence's logits are its own (a norm's weights follow each token's
    coefficients, not the chunk's first)."""
    from pyllm.runtime.llm import LLM
    from pyllm.runtime.lora import AdapterSet

    base, adapter = delta_model["base"], delta_model["both"]
    toks = np.array([1, 5, 77, 12, 130, 4, 9, 66], np.int32)
    with LLM(base, n_ctx=32) as llm:
        ctx = llm.model.new_context(32, n_seq=3, kv_type="f32")
        adapters = AdapterSet(llm.model)
        adapters.mix([(adapter, 1.0)])
        ctx.set_lora_adapters(adapters.cores())
        ctx.seq_set_lora(0, [(0, 1.0)])
        ctx.seq_set_lora(1, [(0, 0.5)])
        tokens_ = np.repeat(toks, 3)
        seq = np.tile(np.arange(3, dtype=np.int32), len(toks))
        want_rows = np.zeros(len(tokens_), np.uint8)
        want_rows[-3:] = 1
        rows = ctx.decode_batch(tokens_, seq, want_rows)
    for i, lora in enumerate([[(adapter, 1.0)], [(adapter, 0.5)], None]):
        alone = _runtime_logits(base, toks, lora)[-1]
        assert np.abs(rows[i] - alone).max() < 1e-4, i
    assert np.abs(rows[0] - rows[2]).max() > 0.1


def test_deltas_that_cannot_be_applied_at_run_time(delta_model: dict[str, Path],
                                                   tmp_path: Path) -> None:
    from pyllm.runtime.llm import LLM

    with GGUFReader(delta_model["base"]) as r:
        emb = r.tensor("token_embd.weight").shape
    w = GGUFWriter(tmp_path / "emb.gguf")
    for k, v in (("general.architecture", "qwen2"), ("general.type", "adapter"),
                 ("adapter.type", "lora"), ("adapter.lora.alpha", 8.0)):
        w.add_kv(k, v)
    w.add_tensor("token_embd.weight.delta", np.zeros(emb, np.float32))
    w.write()
    with pytest.raises(ModelError, match=r"token_embd\.weight cannot be applied at run time"):
        LLM(delta_model["base"], n_ctx=32, lora=[tmp_path / "emb.gguf"])
