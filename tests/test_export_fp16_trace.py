"""The FP16 copies the export half makes: the reference copy is built without a transient FP32 copy,
and the calibrated model is cast to FP16 for the FP8 export with its quantizers' amax kept FP32
(the Q/DQ scales come from it). The export itself is covered by tests/test_export_pipeline.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from enginebuild_builder.export.export_half import _half_copy, _half_for_export


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # tied: must stay one tensor in the copy
        self.register_buffer("mask", torch.ones(8))
        self.register_buffer("index", torch.arange(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.mask)


def test_half_copy_equals_deepcopy_half_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    half = _half_copy(model)
    expected = copy.deepcopy(model).half()
    for key, value in expected.state_dict().items():
        assert half.state_dict()[key].dtype == value.dtype
        assert torch.equal(half.state_dict()[key], value)
    assert half.b.weight is half.a.weight and half.a.weight is not model.a.weight
    assert half.index.dtype == torch.int64
    for key, value in model.state_dict().items():  # the FP32 model is untouched
        assert value.dtype == before[key].dtype and torch.equal(value, before[key])


def test_half_for_export_keeps_quantizer_amax_in_fp32() -> None:
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from enginebuild_builder.export.quantize import fp8_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(32, 16)
    mtq.quantize(model, fp8_config(), lambda m: m(x))
    amax = {n: q._amax.clone() for n, q in model.named_modules() if isinstance(getattr(q, "_amax", None), torch.Tensor)}
    assert amax
    _half_for_export(model)
    assert model[0].weight.dtype == torch.float16
    for name, q in model.named_modules():
        if name in amax:
            assert q._amax.dtype == torch.float32 and torch.equal(q._amax, amax[name])
