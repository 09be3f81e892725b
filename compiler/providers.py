"""Provider slots: per dflash op, the implementations a target may run, chosen by priority.

The shape of vLLM IR (vllm/ir/op.py): one functional op, a native (reference) implementation, providers that
declare what they support. The lowering (a later layer) asks `candidates(op, target)` and takes the first
provider whose `supports(*args)` returns None; a provider that cannot run explains why in a string.
"""

from dataclasses import dataclass, field
from typing import Callable

from .ops import OP_NAMES, REFERENCES

ANY_TARGET = "*"
TARGETS = ("cpu", "cuda", "rocm", "ascend")


def _always(*args, **kwargs) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    op: str
    name: str
    targets: tuple[str, ...]
    impl: Callable
    priority: int = 0
    supports: Callable[..., str | None] = field(default=_always)
    # impl is torch ops + `wrap_triton(kernel)[grid](...)` launches only (compiler/triton/launch.py; no host sync,
    # no state kept across traced calls): lowering registers it as a torch.library.triton_op, so Inductor sees
    # its kernels
    traceable: bool = False

    def runs_on(self, target: str) -> bool:
        return ANY_TARGET in self.targets or target in self.targets


_REGISTRY: dict[str, list[Provider]] = {op: [] for op in OP_NAMES}


def register(provider: Provider) -> Provider:
    if provider.op not in _REGISTRY:
        raise KeyError(f"no dflash op named {provider.op!r}; known: {', '.join(OP_NAMES)}")
    _REGISTRY[provider.op] = [p for p in _REGISTRY[provider.op] if p.name != provider.name] + [provider]
    return provider


def all_providers(op: str) -> list[Provider]:
    return list(_REGISTRY[op])


def candidates(op: str, target: str) -> list[Provider]:
    """Providers of `op` that run on `target`, best first; the reference is always last."""
    found = [p for p in _REGISTRY[op] if p.runs_on(target)]
    return sorted(found, key=lambda p: -p.priority)


for _op, _ref in REFERENCES.items():
    register(Provider(_op, "reference", (ANY_TARGET,), _ref, priority=-1_000_000))
