"""dflash.attention — scaled dot-product attention whose mask is a KIND, not a tensor.

q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (GQA: Hq a multiple of Hkv; SDPA layout, Sk usually a static cache).
q_pos [B, Sq] (int64, optional) is each query's index on the key axis; None means the queries are the last
Sq keys (bottom-right aligned). With qp = q_pos and kv = key index, a key is visible when:
  non_causal : kv <= qp[:, -1]            (every query sees every key up to the last query: DFLASH draft)
  causal     : kv <= qp                   (prefix + causal block: DFLASH verify, decode, prefill)
  sliding    : kv <= qp and qp - kv < window
  custom     : mask (bool, True = visible; or additive float), broadcastable to [B, Hq, Sq, Sk]
"""

import torch
from torch import Tensor

from torch_dflash.errors import InputError

KINDS = ("non_causal", "causal", "sliding", "custom")


def query_positions(q_pos: Tensor | None, sq: int, sk: int, device) -> Tensor:
    if q_pos is not None:
        return q_pos
    return (sk - sq + torch.arange(sq, device=device)).unsqueeze(0)


def visibility(kind: str, window: int, q_pos: Tensor | None, sq: int, sk: int, device) -> Tensor:
    """Boolean [B|1, 1, Sq, Sk] mask of the kind (not for custom)."""
    qp = query_positions(q_pos, sq, sk, device)[:, None, :, None]
    kv = torch.arange(sk, device=device)
    if kind == "non_causal":
        return (kv <= qp[:, :, -1:, :]).expand(-1, -1, sq, -1)
    visible = kv <= qp
    if kind == "sliding":
        visible = visible & (qp - kv < window)
    return visible


def check_args(q, k, v, kind, window, mask):
    torch._check_with(InputError, kind in KINDS, lambda: f"attention: kind {kind!r} is not one of {KINDS}.")
    torch._check_with(InputError, (mask is not None) == (kind == "custom"),
                      lambda: "attention: a mask is given iff kind is custom.")
    torch._check_with(InputError, kind != "sliding" or window > 0,
                      lambda: f"attention: sliding needs window > 0, got {window}.")
    if isinstance(q, torch.fx.Proxy):  # symbolically traced (Ascend codegen): sizes are not known
        return
    torch._check_with(InputError, q.shape[1] % k.shape[1] == 0,
                      lambda: f"attention: q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}).")


def attention_reference(q, k, v, kind, scale, window=0, mask=None, q_pos=None):
    check_args(q, k, v, kind, window, mask)
    sq, sk = q.shape[-2], k.shape[-2]
    if kind != "custom":
        mask = visibility(kind, window, q_pos, sq, sk, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask if mask.dtype == torch.bool else mask.float(),
        scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return token_major(out.to(q.dtype))


def token_major(out: Tensor) -> Tensor:
    """[B, H, S, D] laid out as [B, S, H, D] (the layout dflash.attention promises: the o-projection's input
    `out.transpose(1, 2).reshape(B, S, H·D)` is then a view, not a copy)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("dflash::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, kind: str, scale: float, window: int = 0,
              mask: Tensor | None = None, q_pos: Tensor | None = None) -> Tensor:
    return attention_reference(q, k, v, kind, scale, window, mask, q_pos)


@attention.register_fake
def _(q, k, v, kind, scale, window=0, mask=None, q_pos=None):
    check_args(q, k, v, kind, window, mask)
    batch, heads, sq, _ = q.shape
    return q.new_empty(batch, sq, heads, v.shape[-1]).transpose(1, 2)
