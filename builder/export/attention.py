"""Split `nn.MultiheadAttention` into separate q/k/v/out `nn.Linear` layers.

ModelOpt quantizes `nn.Linear` modules, but `nn.MultiheadAttention` keeps its input projection in a
bare parameter (`in_proj_weight`), so a stock open_clip model exports ~25 % of its weights (every
attention q/k/v projection) unquantized. This module rewrites each attention into an equivalent
module whose projections are real `nn.Linear` layers with the weights copied from the
`in_proj_weight` slices, and whose core is `F.scaled_dot_product_attention`; outputs match the
original to float rounding (checked by `verify_equivalence`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class SplitMultiheadAttention(nn.Module):
    """Drop-in replacement for an inference-mode `nn.MultiheadAttention` (same call signature).

    Dropout is ignored: the builder only runs models in eval mode. `need_weights=True` is not
    supported (nothing on the export path asks for attention maps) and raises.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("attention with bias_k/bias_v/add_zero_attn cannot be split")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        has_bias = mha.in_proj_bias is not None
        e = mha.embed_dim
        self.q_proj = nn.Linear(e, e, bias=has_bias)
        self.k_proj = nn.Linear(mha.kdim, e, bias=has_bias)
        self.v_proj = nn.Linear(mha.vdim, e, bias=has_bias)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        ref = mha.out_proj.weight
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            lin.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                q_w, k_w, v_w = mha.in_proj_weight.chunk(3, dim=0)
            else:
                q_w, k_w, v_w = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            self.q_proj.weight.copy_(q_w)
            self.k_proj.weight.copy_(k_w)
            self.v_proj.weight.copy_(v_w)
            if has_bias:
                q_b, k_b, v_b = mha.in_proj_bias.chunk(3, dim=0)
                self.q_proj.bias.copy_(q_b)
                self.k_proj.bias.copy_(k_b)
                self.v_proj.bias.copy_(v_b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def _additive_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        q_len: int,
        k_len: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Merge both mask kinds into one additive float mask broadcastable to [B, H, L, S].

        nn.MultiheadAttention's boolean masks mean True = "may not attend"; SDPA's mean the
        opposite, so everything is turned into an additive mask (-inf where forbidden) once.
        """
        mask: torch.Tensor | None = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
            else:
                attn_mask = attn_mask.to(dtype)
            if attn_mask.dim() == 2:
                mask = attn_mask.view(1, 1, q_len, k_len)
            else:  # [B * H, L, S]
                mask = attn_mask.view(batch, self.num_heads, q_len, k_len)
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                kpm = torch.zeros_like(key_padding_mask, dtype=dtype).masked_fill(key_padding_mask, float("-inf"))
            else:
                kpm = key_padding_mask.to(dtype)
            kpm = kpm.view(batch, 1, 1, k_len)
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("SplitMultiheadAttention does not return attention weights")
        unbatched = query.dim() == 2
        if unbatched:  # [L, E]: add the batch axis where nn.MultiheadAttention expects it
            axis = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(axis), key.unsqueeze(axis), value.unsqueeze(axis)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, q_len, _ = query.shape
        k_len = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, q_len, h, d).transpose(1, 2)
        k = self.k_proj(key).view(b, k_len, h, d).transpose(1, 2)
        v = self.v_proj(value).view(b, k_len, h, d).transpose(1, 2)
        mask = self._additive_mask(attn_mask, key_padding_mask, b, q_len, k_len, q.dtype)
        if is_causal and mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, q_len, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        return out, None


@dataclass
class SplitResult:
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was kept


def split_attention(model: nn.Module) -> SplitResult:
    """Replace every `nn.MultiheadAttention` in `model` in place; returns what was replaced and skipped."""
    result = SplitResult()
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mha in targets:
        try:
            new = SplitMultiheadAttention(mha)
        except ValueError as exc:
            result.skipped[name] = str(exc)
            log.warning("attention %s kept as nn.MultiheadAttention: %s", name, exc)
            continue
        new.train(mha.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        result.replaced.append(name)
    return result
