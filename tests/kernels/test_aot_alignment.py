"""aot.KernelSpec.divisible_by_16: the 16-byte alignment / divisibility the JIT assumes, given to AOT builds."""

import dataclasses

import pytest
import torch
from aot_testing import run_aot_script

from torch_dflash.compiler.triton import aot
from torch_dflash.compiler.triton import norm_rope as nr


def _spec(**change) -> aot.KernelSpec:
    """A spec of the head epilogue (its fn is only read for arg_names here, so the interpreter does not matter)."""
    fn = nr.norm_rope_heads_kernel
    signature = {name: "constexpr" if name.isupper() else "*bf16" if name.endswith("_ptr") else "i32"
                 for name in fn.arg_names} | {"eps": "fp32"}
    return dataclasses.replace(aot.KernelSpec("heads", fn, signature), **change)


def test_attrs_mark_the_named_arguments_by_index():
    names = nr.norm_rope_heads_kernel.arg_names
    spec = _spec(divisible_by_16=("proj_ptr", "stride_proj_t"))
    assert aot.attrs(spec) == {(names.index("proj_ptr"),): [["tt.divisibility", 16]],
                               (names.index("stride_proj_t"),): [["tt.divisibility", 16]]}
    assert aot.attrs(_spec()) == {}       # specs made before the field existed assume nothing, as before
    assert set(aot.pointer_args(spec.signature)) == {n for n in names if n.endswith("_ptr")}


@pytest.mark.parametrize("name", ["eps", "HD", "no_such_arg"])
def test_attrs_refuse_what_cannot_be_divisible(name):
    with pytest.raises(ValueError, match=f"divisible_by_16 names '{name}'"):
        aot.attrs(_spec(divisible_by_16=(name,)))


AOT_SCRIPT = r"""
import dataclasses, json, re, torch
from torch_dflash.compiler.triton import aot, norm_rope
spec = norm_rope.heads_spec(torch.bfloat16, 128, 128, q_norm=True, k_norm=True, cache=False)
result = {}
for aligned in (True, False):
    ptx = aot.compile_spec(spec if aligned else dataclasses.replace(spec, divisible_by_16=()), "sm_80").asm["ptx"]
    result[str(aligned)] = len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx))
print(json.dumps(result))
"""


def test_aligned_specs_vectorize_their_loads():
    """The head epilogue's spec (pointers aligned, hd-multiple strides divisible by 16) compiles to 16-byte
    loads for sm_80; the same spec without the attrs gets none (what AOT builds were before)."""
    vector_loads = run_aot_script(AOT_SCRIPT, families=("cuda",))
    assert vector_loads["True"] > 0 and vector_loads["False"] == 0, vector_loads
