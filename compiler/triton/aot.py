"""Ahead-of-time compilation of our Triton kernels for GPU architectures this machine may not have.

`triton.compile(ASTSource(...), target=GPUTarget(...))` needs no GPU: it yields cubin for sm_* and hsaco for
gfx*. Each kernel module lists `KernelSpec`s (a kernel, its signature, its constexprs for one configuration).

Alignment: the JIT specializes every pointer that is 16-byte aligned and every int divisible by 16 (the
`tt.divisibility = 16` argument attribute), which is what lets loads vectorize and cp.async / direct-to-LDS
pipelines run. A spec names those arguments in `divisible_by_16`; without it the binary assumes nothing (scalar
loads). A binary built with them is only valid for launches whose arguments satisfy them. The attrs form,
`{(arg_index,): [["tt.divisibility", 16]]}`, is the same in triton 3.6 and 3.9.
"""

from dataclasses import dataclass, field, replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

from . import launch

ARCHS = {
    "sm_80": GPUTarget("cuda", 80, 32),
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
    "gfx950": GPUTarget("hip", "gfx950", 64),
}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: object                      # a @triton.jit or @gluon.jit function
    signature: dict[str, str]       # arg -> "*bf16" | "i32" | "fp32" | "constexpr" ...
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple[str, ...] = ()   # pointers 16-byte aligned, ints multiples of 16 (see above)
    archs: tuple[str, ...] = ()             # the ARCHS it is built for; () = every arch of its family

    def builds_for(self, arch: str) -> bool:
        return not self.archs or arch in self.archs


def pointer_args(signature: dict[str, str]) -> tuple[str, ...]:
    """The pointer arguments of a signature (those the JIT marks aligned when their tensors are)."""
    return tuple(name for name, ty in signature.items() if ty.startswith("*"))


def attrs(spec: KernelSpec) -> dict[tuple[int, ...], list[list]]:
    """ASTSource attrs marking spec.divisible_by_16; ValueError for a name that is not a pointer or int argument."""
    names = spec.fn.arg_names
    for name in spec.divisible_by_16:
        if name not in names or not (spec.signature.get(name, "").startswith(("*", "i", "u"))):
            raise ValueError(f"{spec.name}: divisible_by_16 names {name!r}, which is not a pointer or int argument")
    return {(names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}


def family(arch: str) -> str:
    """'cuda' for sm_*, 'rocm' for gfx* — the key of the launch-config table."""
    if arch in ARCHS:
        return "cuda" if arch.startswith("sm_") else "rocm"
    raise ValueError(f"unknown GPU arch {arch!r}; known: {', '.join(ARCHS)}")


def programmatic(arch: str) -> bool:
    """Whether kernels for `arch` are built for programmatic dependent launch (launch.programmatic's rule): the
    PDL constexpr a spec does not set itself."""
    fam = family(arch)
    return launch.programmatic(fam, ARCHS[arch].arch if fam == "cuda" else 0)


def for_arch(spec: KernelSpec, arch: str) -> KernelSpec:
    """`spec` with the kernel's PDL constexpr set to `programmatic(arch)`, unless the spec sets it."""
    if "PDL" not in spec.fn.arg_names or "PDL" in spec.constexprs:
        return spec
    return replace(spec, signature=spec.signature | {"PDL": "constexpr"},
                   constexprs=spec.constexprs | {"PDL": programmatic(arch)})


def compile_spec(spec: KernelSpec, arch: str):
    """Compile one kernel configuration (`for_arch`) for `arch`; returns the CompiledKernel
    (`.asm['cubin'|'hsaco']`)."""
    family(arch)
    spec = for_arch(spec, arch)
    source_type = GluonASTSource if isinstance(spec.fn, GluonJITFunction) else ASTSource
    source = source_type(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=attrs(spec))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=ARCHS[arch], options=options)


def binary(compiled, arch: str) -> bytes:
    return compiled.asm["cubin" if family(arch) == "cuda" else "hsaco"]
