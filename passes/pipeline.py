"""The default pipeline: canonicalize → fuse (kv_materialize, qkv_norm_rope, mhc_post_pre) → merge sibling
projections → select attention masks → k/v cache writes into the qkv (and kv_materialize) ops → the remaining
RMSNorms, with the residual adds or the embedding gathers before them → SwiGLU products → rope tables (and their
joined positions) → cleanup → decode-sized weight linears → the gate|up linears joined with their products.
Order matters: kv_materialize takes the DFlash draft's context+block sites whole before qkv_norm_rope sees their
block half; merge_sibling_projections runs after them, so it only merges the linears they left (gate/up);
attention_masks runs after the fusions so their outputs feed it; kv_cache_writes takes the q/k/v and context k/v ops
the fusions made, and context_qkv joins the draft's two cache-writing ops per layer into one; rms_norms runs after
the fusions, so it takes only the norms they left, and add_rms_norm and embedding_rms_norm extend those;
weight_linears runs after cleanup, so it takes only the live linears left (o, gate|up, down, lm_head, fc, mHC's
hc_head) — cleanup has dropped the ones the fusions replaced and the no-op casts on weights; linear_silu_mul joins
each gate|up linear it made with the SwiGLU product of its halves; deferred_mlp_norm gives the o linears the
add_rms_norm after them whose rows those gate|up GEMMs read (they finish the norm), and add_rms_norm_linear_silu_mul
joins each gate|up GEMM left with the add_rms_norm in front of it; deferred_rms_norm, last, gives the down linears
the add_rms_norm after them whose rows a cache-writing qkv op reads. rope_cos_sin runs after the fusions (and
silu_mul), which take the cos/sin tables as the graph spells them, and replaces what is left of the table chain;
joined_positions then takes the tables of two position tensors joined (the draft's) with the join.

INDUCTOR_FUSES: the passes a caller skips when Inductor compiles the rewritten graph (backend="dflash" with
inductor on, compile_step="inductor"): Inductor fuses those ops with their neighbours better by itself.
IN_PLACE_ONLY: passes whose ops mutate the graph's buffers (the KV caches). They pay off only in a graph that runs
as written — the runtime's default steps. A re-export (`torch-dflash export`) or an AOT trace before Inductor
holds such an op functionalized (`auto_functionalized`), and running that clones the caches; torch-mlir cannot
import it. Those callers skip them (`skipped_before_export`, `skipped_before_inductor`)."""

from torch_dflash.errors import InputError

from . import (add_rms_norm, add_rms_norm_linear_silu_mul, attention_masks, canonicalize, cleanup, context_qkv,
               deferred_mlp_norm, deferred_rms_norm, embedding_rms_norm, joined_positions, kv_cache_writes,
               kv_materialize, linear_silu_mul, mhc_post_pre, qkv_norm_rope, rms_norms, rope_tables,
               sibling_projections, silu_mul, weight_linears)
from .manager import PassManager

DEFAULT_PASSES = (canonicalize.PASS, kv_materialize.PASS, qkv_norm_rope.PASS, mhc_post_pre.PASS,
                  sibling_projections.PASS, attention_masks.PASS, kv_cache_writes.PASS, context_qkv.PASS,
                  rms_norms.PASS, add_rms_norm.PASS, embedding_rms_norm.PASS, silu_mul.PASS, rope_tables.PASS,
                  joined_positions.PASS, cleanup.PASS, weight_linears.PASS, linear_silu_mul.PASS,
                  deferred_mlp_norm.PASS, add_rms_norm_linear_silu_mul.PASS, deferred_rms_norm.PASS)
PASS_NAMES = tuple(p.name for p in DEFAULT_PASSES)
INDUCTOR_FUSES = (rms_norms.NAME, add_rms_norm.NAME, embedding_rms_norm.NAME, silu_mul.NAME, linear_silu_mul.NAME,
                  rope_tables.NAME, joined_positions.NAME, deferred_mlp_norm.NAME,
                  add_rms_norm_linear_silu_mul.NAME, deferred_rms_norm.NAME)
IN_PLACE_ONLY = (kv_cache_writes.NAME, context_qkv.NAME)


def _also(disabled, names) -> tuple[str, ...]:
    return (*disabled, *(name for name in names if name not in disabled))


def skipped_before_inductor(disabled=()) -> tuple[str, ...]:
    """`disabled` plus INDUCTOR_FUSES and IN_PLACE_ONLY: what to skip when Inductor compiles the result."""
    return _also(disabled, INDUCTOR_FUSES + IN_PLACE_ONLY)


def skipped_before_export(disabled=()) -> tuple[str, ...]:
    """`disabled` plus IN_PLACE_ONLY: what to skip when the result is exported again."""
    return _also(disabled, IN_PLACE_ONLY)


def default_pass_manager(disabled=(), keep_snapshots: bool = False) -> PassManager:
    unknown = set(disabled) - set(PASS_NAMES)
    if unknown:
        raise InputError(f"Unknown pass(es) {', '.join(sorted(unknown))} to disable; passes: {', '.join(PASS_NAMES)}.")
    return PassManager(DEFAULT_PASSES, keep_snapshots=keep_snapshots, disabled=disabled)
