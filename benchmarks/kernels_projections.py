"""Kernel benchmark cases: dflash.qkv_norm_rope at the Qwen3-8B-DFlash-b16 draft shape.

Variants per token count T: 'eager' (Qwen3Attention's prologue as transformers writes it: three linears, view,
Qwen3RMSNorm with .float()/pow/mean/rsqrt, rotate-half rope), 'inductor' (torch.compile of that function),
'gemm_only' (the merged linear alone: the GEMM bound), 'dflash' (the Triton provider, on the path its table picks
for T: the fused GEMM + norm/rope kernel, or the vendor GEMM + one epilogue) and 'dflash_<path>' (the other path,
forced). Anchors on H100 (docs §9), T = 8192: eager 1.88 ms, inductor 0.72 ms, GEMM ≈ 0.52 ms.
x and the weights rotate (harness.py) where one call's bytes would otherwise stay in L2: at T 32 and 512 (the
50 MB of weights); at T 8192 one input set already exceeds 2 × L2 (compute-bound), so nothing rotates.
"""

import torch
import torch.nn.functional as F

from .case import KERNEL_GRAPH_CALLS, Case, Rotation
from torch_dflash.compiler.ops import qkv_norm_rope_reference, rotate_half
from torch_dflash.compiler.triton.norm_rope import family_of
from torch_dflash.compiler.triton.qkv_gemm import fused_gemm_chosen
from torch_dflash.compiler.triton.qkv_norm_rope import PATHS, qkv_norm_rope

QWEN3_8B_DRAFT = dict(hidden=4096, n_q=32, n_kv=8, head_dim=128, tokens=(32, 512, 8192))
TINY = dict(hidden=64, n_q=4, n_kv=2, head_dim=16, tokens=(3, 8, 17))
EPS = 1e-6
ROPE_THETA = 1e6


def qwen3_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3RMSNorm.forward."""
    dtype = h.dtype
    h = h.float()
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def hf_qkv_norm_rope(x, wq, wk, wv, q_norm_w, k_norm_w, cos, sin, eps: float, head_dim: int):
    """Qwen3Attention.forward up to the attention call: q, k, v [B, heads, S, hd]."""
    shape = (*x.shape[:-1], -1, head_dim)
    q = qwen3_rms_norm(F.linear(x, wq).view(shape), q_norm_w, eps).transpose(1, 2)
    k = qwen3_rms_norm(F.linear(x, wk).view(shape), k_norm_w, eps).transpose(1, 2)
    v = F.linear(x, wv).view(shape).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def _rope_tables(tokens: int, head_dim: int, device, dtype):
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(tokens, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _case(tokens: int, hidden: int, n_q: int, n_kv: int, head_dim: int, device, compiled) -> Case:
    dtype = torch.bfloat16
    g = torch.Generator(device).manual_seed(tokens)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    def make_inputs():
        """x and the projection weights, separate (eager, inductor) and merged (gemm_only, dflash): one input set."""
        x = rand(1, tokens, hidden)
        wq, wk, wv = (rand(n * head_dim, hidden, scale=hidden ** -0.5) for n in (n_q, n_kv, n_kv))
        return x, wq, wk, wv, torch.cat((wq, wk, wv))

    inputs = Rotation(make_inputs)
    q_norm_w, k_norm_w = rand(head_dim, scale=0.1) + 1, rand(head_dim, scale=0.1) + 1
    cos, sin = _rope_tables(tokens, head_dim, device, dtype)

    def hf_args():
        x, wq, wk, wv, _ = inputs.current
        return x, wq, wk, wv, q_norm_w, k_norm_w, cos, sin, EPS, head_dim

    def op_args():
        x, w_qkv = inputs.current[0], inputs.current[-1]
        return x, w_qkv, None, q_norm_w, k_norm_w, EPS, cos, sin, n_q, n_kv, head_dim

    compiled = compiled or torch.compile(hf_qkv_norm_rope, dynamic=False)
    x = inputs.current[0]
    chosen = "fused_gemm" if fused_gemm_chosen(x, tokens, family_of(x)) else "gemm_epilogue"
    other = next(path for path in PATHS if path != chosen)

    def check():
        for path in PATHS:
            for got, want in zip(qkv_norm_rope(*op_args(), path=path), qkv_norm_rope_reference(*op_args())):
                scale = want.float().abs().max().item()
                torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=2e-2)

    width = (n_q + 2 * n_kv) * head_dim
    return Case(
        suite="kernels", name=f"qkv_norm_rope T={tokens}",
        variants={"eager": lambda: hf_qkv_norm_rope(*hf_args()), "inductor": lambda: compiled(*hf_args()),
                  "gemm_only": lambda: F.linear(inputs.current[0], inputs.current[-1]),
                  "dflash": lambda: qkv_norm_rope(*op_args()),
                  f"dflash_{other}": lambda: qkv_norm_rope(*op_args(), path=other)},
        check=check,
        floor_bytes=(width * hidden + tokens * hidden + tokens * width) * x.element_size(),
        floor_flops=2 * tokens * hidden * width,
        use_cuda_graph=True,
        graph_calls=KERNEL_GRAPH_CALLS,
        notes=f"H {hidden}, {n_q}/{n_kv} heads, hd {head_dim}, bf16, q/k norm, full rotary; dflash = {chosen}",
        extra={"tokens": tokens},
        rotation=inputs)


def cases(device="cuda", small: bool = False) -> list[Case]:
    """The Qwen3-8B draft shape at T = 32, 512, 8192, 'inductor' compiled statically per T; `small` gives tiny
    shapes that run on CPU, sharing one dynamic-shape compilation."""
    shape = dict(TINY if small else QWEN3_8B_DRAFT)
    tokens = shape.pop("tokens")
    compiled = torch.compile(hf_qkv_norm_rope, dynamic=True) if small else None
    return [_case(t, **shape, device=device, compiled=compiled) for t in tokens]
