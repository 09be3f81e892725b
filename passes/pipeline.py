"""The default pipeline: canonicalize → fuse (kv_materialize, qkv_norm_rope, mhc_post_pre) → merge sibling
projections → select attention masks → the remaining RMSNorms → cleanup → decode-sized weight linears. Order
matters: kv_materialize takes
the DFlash draft's context+block sites whole before qkv_norm_rope sees their block half; merge_sibling_projections
runs after them, so it only merges the linears they left (gate/up); attention_masks runs after the fusions so their
outputs feed it; rms_norms runs after the fusions, so it takes only the norms they left; weight_linears runs last,
so it takes only the live linears left (o, gate|up, down, lm_head, fc, mHC's hc_head) — after cleanup has dropped
the ones the fusions replaced and the no-op casts on weights.

INDUCTOR_FUSES: the passes a caller skips when Inductor compiles the rewritten graph (backend="dflash" with
inductor on, compile_step="inductor"): Inductor fuses those ops with their neighbours better by itself."""

from torch_dflash.errors import InputError

from . import (attention_masks, canonicalize, cleanup, kv_materialize, mhc_post_pre, qkv_norm_rope, rms_norms,
               sibling_projections, weight_linears)
from .manager import PassManager

DEFAULT_PASSES = (canonicalize.PASS, kv_materialize.PASS, qkv_norm_rope.PASS, mhc_post_pre.PASS,
                  sibling_projections.PASS, attention_masks.PASS, rms_norms.PASS, cleanup.PASS, weight_linears.PASS)
PASS_NAMES = tuple(p.name for p in DEFAULT_PASSES)
INDUCTOR_FUSES = (rms_norms.NAME,)


def skipped_before_inductor(disabled=()) -> tuple[str, ...]:
    """`disabled` plus the passes of INDUCTOR_FUSES: what to skip when Inductor compiles the result."""
    return (*disabled, *(name for name in INDUCTOR_FUSES if name not in disabled))


def default_pass_manager(disabled=(), keep_snapshots: bool = False) -> PassManager:
    unknown = set(disabled) - set(PASS_NAMES)
    if unknown:
        raise InputError(f"Unknown pass(es) {', '.join(sorted(unknown))} to disable; passes: {', '.join(PASS_NAMES)}.")
    return PassManager(DEFAULT_PASSES, keep_snapshots=keep_snapshots, disabled=disabled)
