"""The default pipeline: canonicalize → fuse (kv_materialize, qkv_norm_rope, mhc_post_pre) → merge sibling
projections → select attention masks → cleanup → decode-sized weight linears. Order matters: kv_materialize takes
the DFlash draft's context+block sites whole before qkv_norm_rope sees their block half; merge_sibling_projections
runs after them, so it only merges the linears they left (gate/up); attention_masks runs after the fusions so their
outputs feed it; weight_linears runs last, so it takes only the live linears left (o, gate|up, down, lm_head, fc,
mHC's hc_head) — after cleanup has dropped the ones the fusions replaced and the no-op casts on weights."""

from torch_dflash.errors import InputError

from . import (attention_masks, canonicalize, cleanup, kv_materialize, mhc_post_pre, qkv_norm_rope,
               sibling_projections, weight_linears)
from .manager import PassManager

DEFAULT_PASSES = (canonicalize.PASS, kv_materialize.PASS, qkv_norm_rope.PASS, mhc_post_pre.PASS,
                  sibling_projections.PASS, attention_masks.PASS, cleanup.PASS, weight_linears.PASS)
PASS_NAMES = tuple(p.name for p in DEFAULT_PASSES)


def default_pass_manager(disabled=(), keep_snapshots: bool = False) -> PassManager:
    unknown = set(disabled) - set(PASS_NAMES)
    if unknown:
        raise InputError(f"Unknown pass(es) {', '.join(sorted(unknown))} to disable; passes: {', '.join(PASS_NAMES)}.")
    return PassManager(DEFAULT_PASSES, keep_snapshots=keep_snapshots, disabled=disabled)
