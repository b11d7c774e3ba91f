"""LLaMA2-Accessory llama_peft checkpoints -> GGUF adapters (pyllm/tools/convert/accessory.py).

The reference is transformers' Llama with biases on all seven matrices holding the fine-tuned
model: the base weights plus ``B @ A``, the trained biases, the tuned norms. The base GGUF is
pyllm's conversion of the same random tiny model without biases and with the base norms. The
checkpoint is written as Accessory saves it: ``{"model": {"llma.<Meta name>": tensor}}``, q/k
rows of lora_b and of the biases in Meta (= GGUF) order, A in bf16, B in fp16, the norms bf16
(one left unchanged, fp32), the biases fp32; the reference computes with exactly those values.
Adapters are applied through export_lora and read by the numpy reference forward."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pyllm.errors import ConvertError
from pyllm.formats.gguf import GGMLType, GGUFReader
from pyllm.formats.lora import read_adapter
from pyllm.tools.convert import convert_hf
from pyllm.tools.convert.accessory import convert_accessory_lora
from pyllm.tools.convert.lora import convert_lora
from pyllm.tools.convert.tensor_map import permute_qk
from pyllm.tools.export_lora import export_lora
from tests.reference import LlamaRef
from tests.test_cli import run_cli
from tests.test_convert_hf import BASE, hf_logits, make_model, tokens

RANK = 8
N_LAYER = BASE["num_hidden_layers"]
HEADS = {"attention.wq": BASE["num_attention_heads"],
         "attention.wk": BASE["num_key_value_heads"]}
# Meta module -> transformers module
MODULES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj"}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
UNCHANGED_NORM = "llma.layers.1.ffn_norm.weight"
PARAMS = {"dim": BASE["hidden_size"], "n_layers": N_LAYER, "n_heads": BASE["num_attention_heads"],
          "n_kv_heads": BASE["num_key_value_heads"], "norm_eps": BASE["rms_norm_eps"],
          "vocab_size": BASE["vocab_size"], "multiple_of": 32}
PEFT = {"lora_rank": RANK, "bias_tuning": True}


def _meta_rows(t: torch.Tensor, module: str, permute: bool) -> torch.Tensor:
    """transformers' q/k rows -> Meta's (the GGUF order); other modules unchanged."""
    if module not in HEADS or not permute:
        return t
    return torch.from_numpy(permute_qk(t.float().numpy(), HEADS[module])).to(t.dtype)


def make_tuning(base: Any, ranks: dict[str, int] | None = None, permute: bool = True,
                seed: int = 3) -> tuple[dict[str, torch.Tensor], Any]:
    """(the Accessory state dict, the transformers model it makes of ``base``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    ref = make_model("Llama", {"attention_bias": True, "mlp_bias": True})
    missing = ref.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(k.endswith(".bias") for k in missing)  # a base without biases lacks them
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for meta, hf in MODULES.items():
                lin, key = layer.get_submodule(hf), f"llma.layers.{i}.{meta}"
                rank = (ranks or {}).get(meta, RANK)
                a = rand(rank, lin.in_features, std=0.2).to(torch.bfloat16)
                b = rand(lin.out_features, rank, std=0.2).to(torch.float16)
                bias = rand(lin.out_features, std=0.1)
                lin.weight += b.float() @ a.float()
                lin.bias.copy_(bias)
                sd[f"{key}.lora_a.weight"] = a
                sd[f"{key}.lora_b.weight"] = _meta_rows(b, meta, permute)
                sd[f"{key}.bias"] = _meta_rows(bias, meta, permute)
            for meta, hf in NORMS.items():
                norm, key = layer.get_submodule(hf).weight, f"llma.layers.{i}.{meta}.weight"
                if key == UNCHANGED_NORM:
                    sd[key] = norm.detach().clone()  # fp32, equal to the base: no delta
                    continue
                sd[key] = (norm + rand(*norm.shape, std=0.2)).to(torch.bfloat16)
                norm.copy_(sd[key].float())
        final = ref.model.norm.weight
        sd["llma.norm.weight"] = (final + rand(*final.shape, std=0.2)).to(torch.bfloat16)
        final.copy_(sd["llma.norm.weight"].float())
    return sd, ref.eval()


def split_axis(key: str) -> int | None:
    """fairscale's slicing in Accessory's peft.py, written out independently of the converter."""
    if "norm" in key:
        return None
    row = any(f".{m}." in key for m in ROW_PARALLEL)
    if key.endswith(".lora_a.weight"):
        return 1 if row else None
    return None if row else 0


def save_ckpt(folder: Path, sd: dict[str, torch.Tensor], n_shards: int = 1,
              wrap: bool = True) -> Path:
    folder.mkdir(parents=True)
    for rank in range(n_shards):
        shard = {}
        for key, t in sd.items():
            axis = split_axis(key)
            piece = t if axis is None else torch.chunk(t, n_shards, dim=axis)[rank]
            shard[key] = piece.clone().contiguous()  # a view would save the whole storage
        torch.save({"model": shard} if wrap else shard,
                   folder / f"consolidated.{rank:02d}-of-{n_shards:02d}.model.pth")
    return folder


def convert(src: Path, base: Path, out: Path, **kw: Any) -> Path:
    return convert_accessory_lora(src, base, out, kw.pop("outtype", "f32"), progress=False,
                                  **kw)


def max_diff(model_gguf: Path, want: np.ndarray) -> float:
    return float(np.abs(LlamaRef(str(model_gguf)).forward(tokens()) - want).max())


@pytest.fixture(scope="module")
def acc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("accessory")
    base = make_model("Llama", {})
    base.save_pretrained(root / "base")
    base_gguf = convert_hf(root / "base", root / "base.gguf", "f32", progress=False)
    sd, ref = make_tuning(base)
    src = save_ckpt(root / "one" / "ckpt", sd)
    adapter = convert(src, base_gguf, root / "adapter.gguf")
    return {"root": root, "base": base, "base_gguf": base_gguf, "sd": sd, "src": src,
            "adapter": adapter, "want": hf_logits(ref, tokens())}


def test_adapter_matches_the_fine_tuned_model(acc: dict[str, Any], tmp_path: Path) -> None:
    adapter = read_adapter(acc["adapter"])
    blocks = range(N_LAYER)
    assert adapter.alpha == RANK  # Accessory applies B @ A unscaled
    assert set(adapter.pairs) == {f"blk.{i}.{m}.weight" for i in blocks for m in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert adapter.factor("blk.0.attn_q.weight") == 1.0
    norms = {f"blk.{i}.{n}.weight" for i in blocks for n in ("attn_norm", "ffn_norm")}
    biases = {p.replace(".weight", ".bias") for p in adapter.pairs}
    # the unchanged norm is left out
    assert set(adapter.deltas) == biases | (norms - {"blk.1.ffn_norm.weight"}) | {
        "output_norm.weight"}
    # a bias the base lacks is stored whole, in the checkpoint's (Meta = GGUF) row order
    assert np.array_equal(adapter.deltas["blk.0.attn_q.bias"],
                          acc["sd"]["llma.layers.0.attention.wq.bias"].numpy())
    with GGUFReader(acc["adapter"]) as r:
        assert {t.type for t in r} == {GGMLType.F32}
    # in a 16-bit file the pairs are F16, the deltas stay F32
    half = convert(acc["src"], acc["base_gguf"], tmp_path / "f16.gguf", outtype="f16")
    with GGUFReader(half) as r:
        types = {(t.name.rsplit(".", 1)[-1], t.type) for t in r}
    assert types == {("lora_a", GGMLType.F16), ("lora_b", GGMLType.F16),
                     ("delta", GGMLType.F32)}
    merged = export_lora(acc["base_gguf"], [acc["adapter"]], tmp_path / "merged.gguf")
    assert max_diff(merged, acc["want"]) < 1e-4  # measured 2.8e-5 (logits up to ~10)
    assert max_diff(acc["base_gguf"], acc["want"]) > 1.0  # negative control: measured 11.7


def test_the_adapter_applied_at_run_time(acc: dict[str, Any]) -> None:
    """pyllm applies the pairs and the bias/norm deltas at run time (no merge): the fine-tuned
    model's logits; at scale 0.5 those of the model export-lora merges at 0.5."""
    from pyllm.runtime.llm import LLM

    toks = tokens()
    with LLM(acc["base_gguf"], n_ctx=128, kv_type="f32", lora=[acc["adapter"]]) as llm:
        got = llm.logits(toks).astype(np.float64)
        llm.set_lora([(acc["adapter"], 0.5)])
        half = llm.logits(toks).astype(np.float64)
    assert np.abs(got - acc["want"]).max() < 1e-4  # measured 3.6e-5 (logits up to ~10)
    merged = export_lora(acc["base_gguf"], [(acc["adapter"], 0.5)],
                         acc["root"] / "merged-half.gguf")
    half_want = LlamaRef(str(merged)).forward(toks)
    assert np.abs(half - half_want).max() < 1e-4  # measured 2.7e-5
    assert np.abs(half - acc["want"]).max() > 1.0  # the scale reaches the deltas too


def test_a_base_with_biases_gets_their_difference(tmp_path: Path) -> None:
    """Accessory saves tuned values: against a base that has biases, the delta is tuned -
    base (a whole-bias delta would add the base's bias twice)."""
    base = make_model("Llama", {"attention_bias": True, "mlp_bias": True}, seed=5)
    base.save_pretrained(tmp_path / "base")
    base_gguf = convert_hf(tmp_path / "base", tmp_path / "base.gguf", "f32", progress=False)
    sd, ref = make_tuning(base)
    out = convert(save_ckpt(tmp_path / "ckpt", sd), base_gguf, tmp_path / "a.gguf")
    merged = export_lora(base_gguf, [out], tmp_path / "m.gguf")
    # measured 1.9e-5; 3.5 when the converter stored the whole tuned bias (base bias twice)
    assert max_diff(merged, hf_logits(ref, tokens())) < 1e-4


def test_q_k_rows_are_taken_in_meta_order(acc: dict[str, Any], tmp_path: Path) -> None:
    """The parity above checks the q/k rows: the same tuning with transformers' row order
    written into the checkpoint gives other logits."""
    sd, ref = make_tuning(acc["base"], permute=False)
    wrong = convert(save_ckpt(tmp_path / "hf-order", sd), acc["base_gguf"], tmp_path / "a.gguf")
    merged = export_lora(acc["base_gguf"], [wrong], tmp_path / "m.gguf")
    assert max_diff(merged, hf_logits(ref, tokens())) > 1.0  # measured 11.4


def test_two_model_parallel_shards_give_the_same_file(acc: dict[str, Any],
                                                      tmp_path: Path) -> None:
    src = save_ckpt(tmp_path / "ckpt", acc["sd"], n_shards=2)
    with_mp = convert(src, acc["base_gguf"], tmp_path / "a.gguf")
    assert with_mp.read_bytes() == acc["adapter"].read_bytes()
    # a replicated tensor that differs between the shards is refused
    shard = src / "consolidated.01-of-02.model.pth"
    data = torch.load(shard, weights_only=True)
    data["model"]["llma.layers.0.attention.wq.lora_a.weight"] *= 2
    torch.save(data, shard)
    with pytest.raises(ConvertError, match=r"layers\.0\.attention\.wq\.lora_a\.weight: "
                                           "replicated tensor differs between"):
        convert(src, acc["base_gguf"], tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_frozen_weights_and_a_bare_dict(acc: dict[str, Any], tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Older checkpoints also hold the frozen base weights, some save the bare state dict:
    the same adapter, the frozen weights counted in the log."""
    base = acc["base"].state_dict()
    frozen = {"llma.tok_embeddings.weight": base["model.embed_tokens.weight"],
              "llma.output.weight": base["lm_head.weight"],
              "llma.layers.0.attention.wq.weight": base["model.layers.0.self_attn.q_proj.weight"]}
    src = save_ckpt(tmp_path / "ckpt", {**acc["sd"], **frozen}, wrap=False)
    with caplog.at_level(logging.INFO, logger="pyllm.tools.convert"):
        out = convert(src, acc["base_gguf"], tmp_path / "a.gguf")
    assert out.read_bytes() == acc["adapter"].read_bytes()
    assert "ignored 3 frozen base weights" in caplog.text


def test_merge_tuning_writes_a_base_for_the_pairs(acc: dict[str, Any], tmp_path: Path) -> None:
    """The llama.cpp-compatible pair: the base with the bias/norm tuning baked in, and an
    adapter of LoRA pairs only."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    merged_base = out_dir / "tuned-base.gguf"
    pairs = convert(acc["src"], acc["base_gguf"], out_dir / "pairs.gguf",
                    merge_tuning=merged_base)
    assert sorted(os.listdir(out_dir)) == ["pairs.gguf", "tuned-base.gguf"]  # no temp left
    with GGUFReader(pairs) as r:
        names = [t.name for t in r]
    assert len(names) == 2 * 7 * N_LAYER
    assert all(n.endswith((".lora_a", ".lora_b")) for n in names)
    with GGUFReader(merged_base) as r:
        assert r.tensor("blk.0.attn_q.bias").type == GGMLType.F32  # the new biases
    full = export_lora(merged_base, [pairs], tmp_path / "full.gguf")
    assert max_diff(full, acc["want"]) < 1e-4  # measured 2.8e-5
    # negative controls: each half alone is not the fine-tuned model
    assert max_diff(merged_base, acc["want"]) > 1.0  # measured 11.8
    pairs_on_base = export_lora(acc["base_gguf"], [pairs], tmp_path / "p.gguf")
    assert max_diff(pairs_on_base, acc["want"]) > 1.0  # measured 10.0


def test_configs_check_the_checkpoint(acc: dict[str, Any], tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps(PARAMS))
    out = convert(acc["src"], acc["base_gguf"], tmp_path / "a.gguf", configs=[params, PEFT])
    assert out.read_bytes() == acc["adapter"].read_bytes()
    bad = [({"lora_rank": 16}, r"layers\.0\.attention\.wk\.lora_a\.weight: rank 8, but "
                               "config lora_rank is 16"),
           ({"lora_rank": 0}, r"config lora_rank is 0 \(no LoRA\), but the checkpoint holds "
                              r"layers\.0\."),
           ({"bias_tuning": False}, r"config bias_tuning is false, but the checkpoint holds "
                                    r"layers\.0\.attention\.wk\.bias"),
           ({"n_layers": 3}, "config n_layers is 3, the base model base.gguf has 2"),
           ({"dim": 128}, "config dim is 128, the base model base.gguf has 64")]
    for config, message in bad:
        with pytest.raises(ConvertError, match=message):
            convert(acc["src"], acc["base_gguf"], tmp_path / "b.gguf",
                    configs=[params, PEFT, config])
    assert not (tmp_path / "b.gguf").exists()


def test_mixed_ranks_fold_into_b(acc: dict[str, Any], tmp_path: Path) -> None:
    sd, ref = make_tuning(acc["base"], ranks={"feed_forward.w2": 4})
    src = save_ckpt(tmp_path / "ckpt", sd)
    out = convert(src, acc["base_gguf"], tmp_path / "a.gguf")
    adapter = read_adapter(out)
    assert adapter.alpha == RANK and adapter.pairs["blk.0.ffn_down.weight"].rank == 4
    merged = export_lora(acc["base_gguf"], [out], tmp_path / "m.gguf")
    assert max_diff(merged, hf_logits(ref, tokens())) < 1e-4  # measured 2.0e-5
    with pytest.raises(ConvertError, match=r"feed_forward\.w2\.lora_a\.weight: rank 4"):
        convert(src, acc["base_gguf"], tmp_path / "b.gguf", configs=[PEFT])


def _variant(acc: dict[str, Any], folder: Path, drop: tuple[str, ...] = (),
             add: dict[str, torch.Tensor] | None = None) -> Path:
    sd = {k: v for k, v in acc["sd"].items() if k not in drop}
    return save_ckpt(folder, {**sd, **(add or {})})


def test_bad_checkpoints_are_refused(acc: dict[str, Any], tmp_path: Path) -> None:
    sd, base = acc["sd"], acc["base_gguf"]
    two = save_ckpt(tmp_path / "two", sd, n_shards=2)
    (two / "consolidated.01-of-02.model.pth").unlink()
    no_b = _variant(acc, tmp_path / "no-b", drop=("llma.layers.1.feed_forward.w2.lora_b.weight",))
    beyond = _variant(acc, tmp_path / "beyond", add={
        "llma.layers.2.attention.wq.lora_a.weight": sd["llma.layers.1.attention.wq.lora_a.weight"],
        "llma.layers.2.attention.wq.lora_b.weight": sd["llma.layers.1.attention.wq.lora_b.weight"]})
    adapter_v1 = _variant(acc, tmp_path / "llama-adapter", add={
        "llma.layers.0.attention.gate": torch.zeros(1, 4, 1, 1)})
    hf = acc["base"].state_dict()
    full = save_ckpt(tmp_path / "full", {
        "llma.tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "llma.layers.0.attention.wq.weight": hf["model.layers.0.self_attn.q_proj.weight"],
        "llma.layers.0.attention_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "llma.norm.weight": hf["model.norm.weight"], "llma.output.weight": hf["lm_head.weight"]})
    cases = [(two, r"are not one complete model-parallel set"),
             (no_b, r"layers\.1\.feed_forward\.w2\.lora_a\.weight: its lora_b is missing"),
             (beyond, r"layers\.2\.attention\.wq\.lora_a\.weight: block 2, but the base "
                      "model has 2 blocks"),
             (adapter_v1, r"unexpected tensor 'layers\.0\.attention\.gate'"),
             (full, r"no LoRA or bias tensors, but 3 full weights .*a full fine-tune\? convert "
                    "it as a model with pyllm convert"),
             (tmp_path, r"no consolidated\.\*\.pth checkpoint shards")]
    for src, message in cases:
        with pytest.raises(ConvertError, match=message):
            convert(src, base, tmp_path / "out.gguf")
    with pytest.raises(ConvertError, match="is a folder: a LLaMA2-Accessory checkpoint needs"):
        convert(acc["src"], acc["root"] / "base", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_base_of_another_shape_is_refused(acc: dict[str, Any], tmp_path: Path) -> None:
    make_model("Llama", {"intermediate_size": 128}).save_pretrained(tmp_path / "other")
    other = convert_hf(tmp_path / "other", tmp_path / "other.gguf", "f32", progress=False)
    with pytest.raises(ConvertError, match=r"layers\.0\.feed_forward\.w1: "
                                           r"blk\.0\.ffn_gate\.weight is \[128, 64\] in the base "
                                           r"model, the checkpoint's B @ A is \[96, 64\]"):
        convert(acc["src"], other, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_convert_lora_dispatches(acc: dict[str, Any], tmp_path: Path) -> None:
    out = convert_lora(acc["src"], acc["base_gguf"], tmp_path / "a.gguf", "f32", progress=False)
    assert out.read_bytes() == acc["adapter"].read_bytes()
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    with pytest.raises(ConvertError, match="apply to LLaMA2-Accessory checkpoints; this is a "
                                           "PEFT adapter folder"):
        convert_lora(peft_dir, acc["base_gguf"], tmp_path / "b.gguf", configs=[PEFT])
    with pytest.raises(ConvertError, match=r"no adapter_config\.json \(not a PEFT adapter folder\) "
                                           r"and no consolidated\.\*\.pth shards"):
        convert_lora(tmp_path, acc["base_gguf"], tmp_path / "b.gguf")


def test_cli(acc: dict[str, Any], tmp_path: Path) -> None:
    params, peft = tmp_path / "params.json", tmp_path / "peft.json"
    params.write_text(json.dumps(PARAMS))
    peft.write_text(json.dumps(PEFT))
    out, merged = tmp_path / "out.gguf", tmp_path / "merged.gguf"
    args = ("convert-lora", str(acc["src"]), "--base", str(acc["base_gguf"]), "-o", str(out),
            "--outtype", "f32", "--quiet", "--config", str(params), "--config", str(peft))
    r = run_cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out} (f32, ")
    assert out.read_bytes() == acc["adapter"].read_bytes()
    r = run_cli(*args, "--merge-tuning", str(merged), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {merged} (the base with the bias/norm tuning merged" in r.stdout
    full = export_lora(merged, [out], tmp_path / "full.gguf")
    assert max_diff(full, acc["want"]) < 1e-4  # measured 2.8e-5, as through the API
    missing = tmp_path / "nope.json"
    r = run_cli("convert-lora", str(acc["src"]), "--base", str(acc["base_gguf"]), "-o",
                str(tmp_path / "x.gguf"), "--config", str(missing), timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and \
        r.stderr.count("\n") == 1 and f"{missing}: cannot read config" in r.stderr
    assert not (tmp_path / "x.gguf").exists()
