"""Small FX helpers shared by the passes: op tests, parameter lookup, constants built from recipes, replacing a
subgraph's outputs."""

import operator

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree

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
    return _named_tensor(gm, node.target)


def _named_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


RECIPES = "dflash_constant_recipes"   # gm.meta key: constant name -> its recipe (see build_constant)


def recipe_of(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """How the tensor behind get_attr `node` is made from the module's own tensors: the recipe recorded when a
    pass built it, else ("attr", target) — the tensor as it is."""
    return gm.meta.get(RECIPES, {}).get(node.target, ("attr", node.target))


def build_constant(gm: fx.GraphModule, recipe: tuple) -> torch.Tensor:
    """Evaluate a recipe over gm's tensors: ("attr", name) | ("rows", r, start, end) | ("zeros", r, n) (n rows of
    zeros shaped like r's rows) | ("cat", [r, ...]) along dim 0 | ("ones", n, dtype, device) | ("values", floats,
    dtype, device) (a small 1-D tensor a pass computed, e.g. rope's inv_freq) | ("scale_columns", r, v) (r's columns
    times the 1-D v, in r's dtype: a norm's weight folded into the GEMM after it). The compile cache replays recipes
    against the live parameters, so a cached graph never stores weights."""
    kind, *args = recipe
    if kind == "attr":
        value = _named_tensor(gm, args[0])
        if value is None:
            raise KeyError(f"the module has no tensor '{args[0]}'")
        return value
    if kind == "rows":
        return build_constant(gm, args[0])[args[1]:args[2]]
    if kind == "zeros":
        ref = build_constant(gm, args[0])
        return ref.new_zeros(args[1], *ref.shape[1:])
    if kind == "cat":
        return torch.cat([build_constant(gm, part) for part in args[0]]).detach()
    if kind == "ones":
        return torch.ones(args[0], dtype=args[1], device=args[2])
    if kind == "values":
        return torch.tensor(args[0], dtype=args[1], device=args[2])
    if kind == "scale_columns":
        return scale_columns(build_constant(gm, args[0]), build_constant(gm, args[1]))
    raise ValueError(f"unknown constant recipe {kind!r}")


def scale_columns(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w [N, K] times v [K] along its columns, in fp32, rounded to w's dtype once."""
    return (w.float() * v.float()).to(w.dtype).detach()


def add_constant(gm: fx.GraphModule, anchor: fx.Node, prefix: str, recipe: tuple,
                 value: torch.Tensor | None = None, like: fx.Node | None = None) -> fx.Node:
    """Register the constant `recipe` describes on gm under a fresh name (recording the recipe) and return a get_attr
    node for it, inserted before anchor. `value`: the constant built from gm's tensors as they are now, where the
    recipe's own sources (parameters a merge replaced) have left gm. `like`: a node whose fake value's mode gives
    the new node its meta["val"]."""
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    name = f"{prefix}_{i}"
    gm.register_buffer(name, build_constant(gm, recipe) if value is None else value, persistent=True)
    gm.meta.setdefault(RECIPES, {})[name] = recipe
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    fake_mode = detect_fake_mode([meta_val(like)]) if like is not None else None
    if fake_mode is not None:
        node.meta["val"] = fake_mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def meta_val(node: object):
    """The FakeTensor (or SymInt) recorded for node by export / AOT tracing, if any."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def node_arg(node: fx.Node, i: int, name: str, default=None):
    """Argument `name` of a call, given positionally at index i or as a keyword."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def tensor_meta(node: object) -> torch.Tensor | None:
    """The FakeTensor recorded for node when it is a tensor, else None."""
    val = meta_val(node)
    return val if isinstance(val, torch.Tensor) else None


def sym_expr(value):
    """A python int / SymInt / SymBool (or a node whose meta value is one) as a sympy expression, else None."""
    if isinstance(value, fx.Node):
        value = meta_val(value)
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, (torch.SymInt, torch.SymBool)):
        return value.node.expr
    return None


def same_sizes(a, b) -> bool:
    """True when two shapes (ints / SymInts) are provably equal entry by entry."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        ex, ey = sym_expr(x), sym_expr(y)
        if ex is None or ey is None or (ex - ey).expand() != 0:
            return False
    return True


def infer_meta(node: fx.Node) -> None:
    """Record node.meta["val"] for a freshly inserted call by running it on its inputs' fake values."""
    inputs = [n for n in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(n, fx.Node)]
    if any(meta_val(n) is None for n in inputs):
        return
    args, kwargs = pytree.tree_map_only(fx.Node, meta_val, (node.args, node.kwargs))
    fake_mode = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
    if fake_mode is None:  # only SymInt inputs (arange(n)): take the mode of the graph's first fake tensor
        fake = next((v for n in node.graph.nodes if isinstance(v := meta_val(n), torch.Tensor)), None)
        fake_mode = detect_fake_mode([fake]) if fake is not None else None
    if fake_mode is None:
        return
    with fake_mode, torch.no_grad():
        node.meta["val"] = _linear_meta(*args) if node.target is aten.linear.default else node.target(*args, **kwargs)


def _linear_meta(x, weight, bias=None):
    """aten.linear's output by shape: torch 2.11's composite linear calls matmul's numel() on symbolic sizes."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


VIEW_CHAIN = (aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.t, aten.unsqueeze,
              aten.squeeze, aten.expand, aten.slice, aten.select, aten.alias)


def relax_views(node: fx.Node) -> None:
    """After `node` replaced another op: its output may be laid out differently from the traced op's (a fused op
    returns contiguous tensors where e.g. a CPU flash kernel returned [B, S, H, D]-strided ones), and an AOT graph's
    `view` downstream assumed the old strides. Turn the views in the chain of view ops after node into reshapes
    (the same values; still a view where the strides allow), unless something writes through the chain."""
    chain, stack = [], [node]
    while stack:
        for user in stack.pop().users:
            if is_call(user, *VIEW_CHAIN) and user.args[0] in (node, *chain):
                chain.append(user)
                stack.append(user)
    for n in (node, *chain):
        for user in n.users:
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return
    for n in chain:
        if is_call(n, aten.view, aten._unsafe_view):
            n.target = aten.reshape.default


def fuse_pair(gm: fx.GraphModule, anchor: fx.Node, target, args: tuple, replaced: tuple[fx.Node, fx.Node]) -> None:
    """Insert target(*args) (two outputs) before `anchor`; output i takes the users of replaced[i], which is then
    erased. A get_attr in args (a weight, defined after anchor) moves before it: it reads nothing."""
    for arg in args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            anchor.prepend(arg)
    with gm.graph.inserting_before(anchor):
        fused = gm.graph.call_function(target, args)
        outputs = [gm.graph.call_function(operator.getitem, (fused, i)) for i in range(2)]
    for node in (fused, *outputs):
        infer_meta(node)
    for old, new in zip(replaced, outputs):
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
