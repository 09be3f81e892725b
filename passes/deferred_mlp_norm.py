"""deferred_mlp_norm: a decoder layer's post-attention RMSNorm, between the o GEMM and the gate|up GEMM, is split
between them — deferred_rms_norm's rewrite (`defer_norms`) for the gate|up GEMM as the reader.

before:  y = dflash.linear(attn, W_o, b_o)
         normed, s = dflash.add_rms_norm(y, residual, w_norm, eps)       (s, the residual stream, read further on)
         h = dflash.linear_silu_mul(normed, W_gate_up, None)
after:   s, s_w, sumsq = dflash.linear_add_norm_stats(attn, W_o, b_o, residual, w_norm)
         h = dflash.linear_silu_mul(s_w, W_gate_up, None, x_sumsq=sumsq, x_eps=eps)
The o GEMM stores what each of its programs can (the sum, the weighted rows, the 64-column sums of squares); the
gate|up GEMM streams its weight against s_w alone and scales each row of its fp32 product by the norm's 1/rms.
Runs before add_rms_norm_linear_silu_mul, which takes the norms it leaves (its GEMM normalizes x + residual inside
the K loop: two operands and Σ s² per K step, ≈ 2.9 µs per gate|up call more on the H100 —
docs/kernels/skinny_gemm.md "The norm deferred into the gate|up GEMM"). Skipped before Inductor. Guards and their
rejections: deferred_rms_norm's, with "the gate|up GEMM" for the reader.
Numerics: the GEMM reads s · w_norm rounded to the activation dtype and scales its fp32 product by 1/rms (the pair
rounded the normed row once) — within bf16 rounding; fp32 differs by reassociation only.
"""

import torch
import torch.fx as fx

from .deferred_rms_norm import defer_norms
from .manager import GraphPass, PassContext

NAME = "deferred_mlp_norm"
READERS = (torch.ops.dflash.linear_silu_mul,)


def run(gm: fx.GraphModule, ctx: PassContext) -> None:
    defer_norms(gm, ctx, NAME, READERS, "gate|up GEMM")


PASS = GraphPass(NAME, run)
