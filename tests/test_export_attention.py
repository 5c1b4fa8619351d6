"""The attention split that lets ModelOpt quantize open_clip's `in_proj`: numerically the same
module, and the layer census that the report relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from enginebuild_contract.spec import ModelSpec
from enginebuild_builder.export.attention import SplitMultiheadAttention, split_attention
from enginebuild_builder.export.model_loading import load_model
from enginebuild_builder.export.quantize import VISION_EXCLUSION_PATTERNS, count_layers, fp8_config
from plugins.export import TINY_LINEAR, tiny_config  # noqa: F401

TOL = 1e-4


def _pair(batch_first: bool = True, bias: bool = True, kdim: int | None = None) -> tuple[nn.MultiheadAttention, SplitMultiheadAttention]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim).eval()
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, SplitMultiheadAttention(mha).eval()


def _both(mha: nn.Module, split: nn.Module, *args: torch.Tensor, **kw: object) -> float:
    with torch.no_grad():
        a = mha(*args, need_weights=False, **kw)[0]
        b = split(*args, need_weights=False, **kw)[0]
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_matches(batch_first: bool, bias: bool) -> None:
    mha, split = _pair(batch_first, bias)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    assert _both(mha, split, x, x, x) < TOL


def test_causal_float_mask_matches() -> None:
    mha, split = _pair()
    x = torch.randn(2, 6, 32)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    assert _both(mha, split, x, x, x, attn_mask=causal) < TOL


def test_bool_and_per_head_masks_and_key_padding_match() -> None:
    mha, split = _pair()
    x = torch.randn(2, 5, 32)
    bool_mask = torch.zeros(5, 5, dtype=torch.bool)
    bool_mask[:, 3] = True
    assert _both(mha, split, x, x, x, attn_mask=bool_mask) < TOL
    per_head = torch.randn(2 * 4, 5, 5)
    assert _both(mha, split, x, x, x, attn_mask=per_head) < TOL
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    assert _both(mha, split, x, x, x, key_padding_mask=padding) < TOL


def test_cross_attention_with_other_key_dims_matches() -> None:
    mha, split = _pair(kdim=24)
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 9, 24)
    assert _both(mha, split, q, kv, kv) < TOL


def test_projections_are_linear_layers_with_copied_weights() -> None:
    mha, split = _pair()
    q_w, k_w, v_w = mha.in_proj_weight.chunk(3)
    assert torch.equal(split.q_proj.weight, q_w) and torch.equal(split.v_proj.weight, v_w)
    assert torch.equal(split.k_proj.bias, mha.in_proj_bias.chunk(3)[1])
    assert all(isinstance(m, nn.Linear) for m in (split.q_proj, split.k_proj, split.v_proj, split.out_proj))


def test_unsupported_variants_are_kept_and_reported() -> None:
    model = nn.Sequential(nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True))
    result = split_attention(model)
    assert result.replaced == [] and "0" in result.skipped
    assert isinstance(model[0], nn.MultiheadAttention)


def test_whole_open_clip_model_is_equivalent_after_split(tiny_config: Path) -> None:
    model = load_model(ModelSpec(config=str(tiny_config)), None).model
    torch.manual_seed(1)
    image, text = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 16))
    with torch.no_grad():
        before = model.encode_image(image), model.encode_text(text)
        result = split_attention(model)
        after = model.encode_image(image), model.encode_text(text)
    assert len(result.replaced) == 4 and not result.skipped
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    for a, b in zip(before, after):
        assert float((a - b).abs().max()) < TOL


def test_layer_census_before_and_after_split(tiny_config: Path) -> None:
    model = load_model(ModelSpec(config=str(tiny_config)), None).model
    stock = count_layers(model)
    # stock open_clip: per block out_proj, c_fc, c_proj + in_proj (bare); + conv / final proj
    assert stock["image"].linear == 2 * 4 + 2 and stock["text"].linear == 2 * 4 + 1
    assert stock["image"].quantized == 0
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in stock["image"].unquantized
    split_attention(model)
    counts = count_layers(model)
    assert counts["image"].linear == TINY_LINEAR["image"] and counts["text"].linear == TINY_LINEAR["text"]


def test_fp8_config_keeps_vision_towers_that_modelopt_default_excludes() -> None:
    import modelopt.torch.quantization as mtq

    names = lambda cfg: {r.get("quantizer_name") for r in cfg["quant_cfg"]}  # noqa: E731
    assert "*visual*" in names(mtq.FP8_DEFAULT_CFG)  # the ModelOpt >= 0.45 behaviour we work around
    ours = fp8_config()
    assert not (names(ours) & VISION_EXCLUSION_PATTERNS)
    assert fp8_config(include_vision=False) == mtq.FP8_DEFAULT_CFG
    assert ours["algorithm"] == "max"
    wq = [r for r in ours["quant_cfg"] if r.get("quantizer_name") == "*weight_quantizer"][0]
    assert tuple(wq["cfg"]["num_bits"]) == (4, 3) and wq["cfg"]["axis"] is None  # E4M3, per tensor


def test_unbatched_input_matches() -> None:
    mha, split = _pair()
    x = torch.randn(5, 32)
    assert _both(mha, split, x, x, x) < TOL
