"""Small FX helpers shared by the passes: op tests, parameter lookup, replacing a subgraph's outputs."""

import torch
import torch.fx as fx

aten = torch.ops.aten


def is_call(node: object, *targets) -> bool:
    """True when node is a call_function to one of targets (OpOverload or OpOverloadPacket)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is t or packet is t for t in targets)


def attr_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a parameter, buffer or constant), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, anchor: fx.Node, prefix: str, value: torch.Tensor) -> fx.Node:
    """Register `value` on gm under a fresh name and return a get_attr node for it, inserted before anchor."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    name = f"{prefix}_{i}"
    gm.register_buffer(name, value, persistent=True)
    with gm.graph.inserting_before(anchor):
        return gm.graph.get_attr(name)


def meta_val(node: object):
    """The FakeTensor (or SymInt) recorded for node by export / AOT tracing, if any."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None
