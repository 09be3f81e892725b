"""Our Triton kernels are visible to Inductor: each Triton provider op is a torch.library.triton_op, so AOTAutograd
(the pass that hands Inductor its graph) decomposes it into `triton_kernel_wrapper_functional` launches of our
kernels, which Inductor then calls from its own generated code — no opaque Python op per call.

Traced on CPU with fake CUDA tensors in a child process without TRITON_INTERPRET (an interpreted kernel cannot be
traced); Triton's driver is told the target is sm_90 so torch can read each kernel's TTIR to find which pointers
it stores through. On the H100, tests/test_backend_models.py::test_gpu_inductor_calls_our_kernels checks the
compiled code and the numbers.
"""

from aot_testing import run_aot_script

SCRIPT = r"""
import json, sys, types
import torch, triton
from triton.backends.compiler import GPUTarget
triton.runtime.driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))

from functorch.compile import aot_function, make_boxed_func
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import torch_dflash
from torch_dflash.compiler import lowering
from torch_dflash.compiler.triton import attention_decode

attention_decode.device_facts = lambda index: ((9, 0), 132)   # an H100's: no device to ask here (decode's view only)
dflash = torch.ops.dflash
H, NQ, NKV, HD, T, CTX, N = 1024, 8, 2, 128, 16, 256, 4


def step(x, w_qkv, qn, kn, cos, sin, k_cache, v_cache, w_o, res, post, comb, fn, base, scale, norm_w, ctx, w_kv):
    q, k, v = dflash.qkv_norm_rope(x, w_qkv, None, qn, kn, 1e-6, cos, sin, NQ, NKV, HD)
    keys = torch.cat([k_cache, k.transpose(1, 2)], dim=2)
    values = torch.cat([v_cache, v.transpose(1, 2)], dim=2)
    o = dflash.attention(q.transpose(1, 2), keys, values, "non_causal", HD ** -0.5)
    o = dflash.linear(o.transpose(1, 2).reshape(1, T, NQ * HD), w_o, None)
    new_res, layer_in, post_next, comb_next = dflash.mhc_post_pre(
        o, res, post, comb, fn, base, scale, norm_w, 1e-6, 1e-6, 3, 1e-6)
    ck, cv = dflash.kv_materialize(ctx, w_kv, None, kn, 1e-6, cos, sin, NKV, HD)
    return new_res, dflash.rms_norm(layer_in, norm_w, 1e-6), post_next, comb_next, ck, cv


mode = FakeTensorMode()
with mode:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    f32 = dict(device="cuda", dtype=torch.float32)
    inputs = (torch.empty(1, T, H, **bf), torch.empty((NQ + 2 * NKV) * HD, H, **bf), torch.empty(HD, **bf),
              torch.empty(HD, **bf), torch.empty(1, T, HD, **bf), torch.empty(1, T, HD, **bf),
              torch.empty(1, NKV, CTX, HD, **bf), torch.empty(1, NKV, CTX, HD, **bf), torch.empty(H, NQ * HD, **bf),
              torch.empty(1, T, N, H, **bf), torch.empty(1, T, N, **f32), torch.empty(1, T, N, N, **f32),
              torch.empty((2 + N) * N, N * H, **f32), torch.empty((2 + N) * N, **f32), torch.empty(3, **f32),
              torch.empty(H, **bf), torch.empty(1, T, H, **bf), torch.empty(2 * NKV * HD, H, **bf))
gm = make_fx(step, tracing_mode="fake")(*inputs)
choices = lowering.lower(gm, "cuda")
providers = {op: sorted({c.provider for c in cs}) for op, cs in choices.items()}
declined = {op: [d for c in cs for d in c.declined] for op, cs in choices.items()}

graphs = []
def capture(aot_gm, aot_inputs):
    graphs.append(aot_gm)
    return make_boxed_func(aot_gm.forward)
with mode:
    aot_function(gm, fw_compiler=capture)(*inputs)

aot = graphs[0]
placeholders = {n.name for n in aot.graph.nodes if n.op == "placeholder"}
launches, cloned_inputs = [], []
for node in aot.graph.nodes:
    if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        launches.append(getattr(kernel, "fn", kernel).__name__)
        kwargs = node.kwargs["kwargs"]
        cloned_inputs += [name for name in node.kwargs["tensors_to_clone"]
                          if getattr(kwargs[name], "name", None) in placeholders]
opaque = sorted({str(n.target) for n in aot.graph.nodes if "dflash" in str(n.target)})
outputs = len(next(n for n in aot.graph.nodes if n.op == "output").args[0])
from torch_dflash.compiler.triton.launch import wrap_triton
kernel = attention_decode.attention_decode_kernel
eager_launch = "kernel" if wrap_triton(kernel) is kernel else type(wrap_triton(kernel)).__name__
with mode:
    traced_launch = type(wrap_triton(kernel)).__name__
print(json.dumps(dict(providers=providers, declined=declined, launches=launches, cloned_inputs=cloned_inputs,
                      opaque=opaque, outputs=outputs, eager_launch=eager_launch, traced_launch=traced_launch)))
"""


def test_inductor_sees_every_triton_launch_and_copies_no_input():
    result = run_aot_script(SCRIPT, families=("cuda",))
    assert result["providers"] == {op: ["triton"] for op in (
        "qkv_norm_rope", "attention", "linear", "mhc_post_pre", "kv_materialize", "rms_norm")}, result["declined"]
    assert result["opaque"] == [], "a provider op stayed opaque to Inductor"
    launched = set(result["launches"])
    assert {"attention_decode_kernel", "skinny_gemm_kernel", "_wide_kernel", "_rows_kernel", "norm_rope_heads_kernel",
            "rms_norm_rows_kernel"} <= launched, launched
    assert result["cloned_inputs"] == [], "a kernel was assumed to write an input: Inductor would copy it per call"
    assert result["outputs"] == 6, "mutated inputs came back as extra outputs"
    # eager calls launch the kernel itself: no higher-order-op dispatch per launch on the host
    assert (result["eager_launch"], result["traced_launch"]) == ("kernel", "TraceableTritonKernelWrapper")


FP64_SCRIPT = r"""
import dataclasses, json
from torch_dflash.compiler.ops import OP_NAMES
from torch_dflash.compiler.triton import aot
from torch_dflash.kernel_export import _provider_modules, _specs

seen, result = set(), {}
for module in _provider_modules(OP_NAMES, traceable_only=True):
    for spec in _specs(module, "cuda"):
        floats = {name: "fp64" for name, ty in spec.signature.items() if ty == "fp32"}
        if spec.fn.__name__ in seen or not floats:
            continue
        seen.add(spec.fn.__name__)
        try:
            aot.compile_spec(dataclasses.replace(spec, signature=spec.signature | floats), "sm_90")
            result[spec.fn.__name__] = sorted(floats)
        except Exception as error:
            result[spec.fn.__name__] = f"{type(error).__name__}: {error}"[-600:]
print(json.dumps(result))
"""


def test_every_kernel_compiles_with_its_float_scalars_typed_fp64():
    """Inductor types the Python floats it passes to a user kernel (eps, the softmax scale) as fp64, where eager
    Triton says fp32; each kernel casts them to fp32 first, or an fp64 value would widen its fp32 loop carries (a
    compile error) or its math (half speed). Every kernel with a float scalar compiles for sm_90 that way."""
    result = run_aot_script(FP64_SCRIPT, families=("cuda",))
    failed = {name: why for name, why in result.items() if isinstance(why, str)}
    assert not failed, failed
    assert {"attention_decode_kernel", "norm_rope_heads_kernel", "_mhc_kernel"} <= set(result), result


EMBED_SCRIPT = r"""
import json
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure
from torch_dflash.compiler.ops import OP_NAMES
from torch_dflash.kernel_export import _provider_modules, _specs

result = {}
for module in _provider_modules(OP_NAMES, traceable_only=True):
    for spec in _specs(module, "cuda"):
        source = closure(spec.fn)   # the kernel and every @triton.jit function it calls, as Inductor copies them
        # as Inductor's async_compile.triton(name, '''…''') holds it
        embedded = "'''" + source.replace("'''", "\\'\\'\\'") + "'''"
        result[spec.fn.__name__] = eval(embedded) == source
print(json.dumps(result))
"""


def test_every_kernel_source_survives_inductors_embedding():
    """Inductor pastes a user kernel's source (with the @triton.jit functions it calls) into a plain '''-string of
    its generated module, escaping only the quotes: a backslash escape in a kernel (an inline-asm "\\n") turns into
    a raw newline there and the module no longer compiles (found on the H100 with an L2-prefetch inline asm tried in
    session 6: every compile_step="inductor" step failed). Every kernel of the providers reads back unchanged."""
    result = run_aot_script(EMBED_SCRIPT, families=("cuda",))
    assert result and all(result.values()), result
    assert {"skinny_gemm_kernel", "qkv_gemm_norm_rope_kernel", "attention_decode_kernel"} <= set(result)
