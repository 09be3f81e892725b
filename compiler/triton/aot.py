"""Ahead-of-time compilation of our Triton kernels for GPU architectures this machine may not have.

`triton.compile(ASTSource(...), target=GPUTarget(...))` needs no GPU: it yields cubin for sm_* and hsaco for
gfx*. Each kernel module lists `KernelSpec`s (a kernel, its signature, its constexprs for one configuration).
"""

from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: object                      # a @triton.jit function
    signature: dict[str, str]       # arg -> "*bf16" | "i32" | "fp32" | "constexpr" ...
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


def family(arch: str) -> str:
    """'cuda' for sm_*, 'rocm' for gfx* — the key of the launch-config table."""
    if arch in ARCHS:
        return "cuda" if arch.startswith("sm_") else "rocm"
    raise ValueError(f"unknown GPU arch {arch!r}; known: {', '.join(ARCHS)}")


def compile_spec(spec: KernelSpec, arch: str):
    """Compile one kernel configuration for `arch`; returns the CompiledKernel (`.asm['cubin'|'hsaco']`)."""
    family(arch)
    source = ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=ARCHS[arch], options=options)


def binary(compiled, arch: str) -> bytes:
    return compiled.asm["cubin" if family(arch) == "cuda" else "hsaco"]
