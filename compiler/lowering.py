"""Lowering: pick, per dflash op node, the provider that runs it on the target — the ONE place where the
platform is chosen.

before:  %q, %k, %v = dflash.qkv_norm_rope(%x, ...)
after:   %q, %k, %v = dflash_triton.qkv_norm_rope(%x, ...)     (target cuda/rocm, Triton supports the shapes)
         %q, %k, %v = dflash.qkv_norm_rope(%x, ...)            (cpu, or no provider supports them: the reference)

Each provider runs behind a custom op `dflash_<provider>::<op>` with the dflash op's schema, so the lowered graph
still exports. A traceable provider (the Triton ones) is a `torch.library.triton_op`: Inductor's AOT pass
decomposes it into its `wrap_triton` launches and calls our kernels from its own generated code, planning memory
around them; other providers (Ascend, test stubs) are opaque kernels to Inductor. Providers are asked
`supports(*example_args)` on the node's fake values, best priority first; the reasons of those that declined
are kept for the report, and the choice is logged once per (op, target, provider).
"""

import functools
import importlib
import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.fx as fx

from torch_dflash.errors import InputError

from . import providers
from .ops import OP_NAMES

log = logging.getLogger("torch_dflash")

PROVIDER_PACKAGES = {"cuda": "triton", "rocm": "triton", "ascend": "ascend"}
PROVIDER_MODULES = {
    "triton": ("qkv_norm_rope", "kv_materialize", "context_qkv", "norm_rope", "embedding", "mlp", "mhc",
               "mhc_single_pass", "attention", "linear", "rope_tables"),
    "ascend": ("providers",),
}


def detect_target() -> str:
    """'cuda', 'rocm', 'ascend' or 'cpu'. ROCm is told by torch.version.hip — never by comparing
    torch.version.cuda, which is None on ROCm (the comparison that crashed SGLang's FA3 check)."""
    if torch.cuda.is_available():
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    npu = getattr(torch, "npu", None)
    if importlib.util.find_spec("torch_npu") is not None and npu is not None and npu.is_available():
        return "ascend"
    return "cpu"


def resolve_target(name: str = "auto") -> str:
    if name == "auto":
        return detect_target()
    if name not in providers.TARGETS:
        raise InputError(f"Unknown target '{name}'; choose auto or one of {', '.join(providers.TARGETS)}.")
    return name


@cache
def load_providers(target: str) -> tuple[str, ...]:
    """Import the provider modules of `target` (they register on import); returns those that could not be
    imported with why — an absent toolchain means fewer providers, never a crash."""
    package = PROVIDER_PACKAGES.get(target)
    missing = []
    for module in PROVIDER_MODULES.get(package, ()):
        try:
            importlib.import_module(f"torch_dflash.compiler.{package}.{module}")
        except ImportError as error:
            missing.append(f"{package}.{module}: {error}")
    return tuple(missing)


@cache
def provider_op(op: str, provider_name: str):
    """The custom op `dflash_<provider>::<op>` that calls the provider's implementation."""
    reference = getattr(torch.ops.dflash, op).default
    provider = next(p for p in providers.all_providers(op) if p.name == provider_name)
    namespace = f"dflash_{provider_name}"
    if provider.traceable and os.environ.get("TRITON_INTERPRET") != "1":  # interpreted kernels cannot be traced
        impl = _with_signature(provider.impl, reference._schema)
        mutated = tuple(arg.name for arg in reference._schema.arguments if arg.alias_info and arg.alias_info.is_write)
        op_def = torch.library.triton_op(f"{namespace}::{op}", impl, mutates_args=mutated)
        op_def.register_fake(lambda *args, **kwargs: reference(*args, **kwargs))  # shapes without device queries
        return getattr(getattr(torch.ops, namespace), op).default
    schema = str(reference._schema).split("(", 1)[1]
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define(f"{op}({schema}")
    _LIBRARIES.append(library)
    library.impl(op, provider.impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{namespace}::{op}", lambda *args, **kwargs: reference(*args, **kwargs))
    return getattr(getattr(torch.ops, namespace), op).default


_LIBRARIES: list = []  # keep the fragments alive for the life of the process

_ANNOTATIONS = {"Tensor": torch.Tensor, "Optional[Tensor]": torch.Tensor | None, "float": float, "int": int,
                "SymInt": int, "str": str, "bool": bool, "ScalarType": torch.dtype}


def _with_signature(impl, schema):
    """impl behind a wrapper whose annotated signature spells `schema` (triton_op infers the op's schema from
    annotations; provider functions are not annotated). `__wrapped__` stays impl, so torch's scan for the
    wrap_triton kernels (they key AOTAutograd's cache) reads the provider's source."""
    params = [inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=_ANNOTATIONS[str(arg.real_type)],
                                default=arg.default_value if arg.has_default_value() else inspect.Parameter.empty)
              for arg in schema.arguments]
    returns = [torch.Tensor for _ in schema.returns]
    wrapper = functools.wraps(impl)(lambda *args, **kwargs: impl(*args, **kwargs))
    returned = None if not returns else returns[0] if len(returns) == 1 else tuple[tuple(returns)]
    wrapper.__signature__ = inspect.Signature(params, return_annotation=returned)
    return wrapper


@dataclass
class LoweringChoice:
    op: str
    provider: str
    declined: list[tuple[str, str]] = field(default_factory=list)   # (provider, reason)


def _fake(value):
    return value.meta.get("val") if isinstance(value, fx.Node) else value


def choose(op: str, target: str, args, kwargs) -> LoweringChoice:
    declined = []
    for provider in providers.candidates(op, target):
        reason = provider.supports(*args, **kwargs)
        if reason is None:
            return LoweringChoice(op, provider.name, declined)
        declined.append((provider.name, reason))
    raise AssertionError(f"the reference provider of {op} declined")  # the reference supports everything


_LOGGED: set = set()


def lower(gm: fx.GraphModule, target: str) -> dict[str, list[LoweringChoice]]:
    """Rewrite every dflash op node of gm to its provider's op for `target`; returns the choices per op."""
    load_providers(target)
    choices: dict[str, list[LoweringChoice]] = {}
    for node in gm.graph.nodes:
        op = _dflash_op_name(node)
        if op is None:
            continue
        args = tuple(_fake(a) for a in node.args)
        kwargs = {k: _fake(v) for k, v in node.kwargs.items()}
        choice = choose(op, target, args, kwargs)
        choices.setdefault(op, []).append(choice)
        if choice.provider != "reference":
            node.target = provider_op(op, choice.provider)
        if (op, target, choice.provider) not in _LOGGED:
            _LOGGED.add((op, target, choice.provider))
            declined = "; ".join(f"{name}: {why}" for name, why in choice.declined)
            log.info("lowering %s on %s -> %s%s", op, target, choice.provider, f" (declined: {declined})" if declined else "")
    gm.recompile()
    return choices


def _dflash_op_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if node.target.namespace != "dflash" or node.target._opname not in OP_NAMES:
        return None
    return node.target._opname
