"""mask_algebra — what an attention mask built in the graph computes, as a sympy formula, and which kind it is.

Evaluation. Each node of the mask's producer subgraph becomes a `SymTensor`: a sympy expression in the index
symbols i0 … i(n−1) of its own axes (i_k = the index along axis k; an axis of size 1 is read at index 0), with
its shape from the node's fake value. Leaves are aranges (start + step·i0), constants, SymInts (their sympy
expression from the shape environment) and integer graph inputs — position tensors such as cache_positions,
which become an undefined integer function P(i0, i1, …). Anything else stops the evaluation with a reason:
a bool or float input (a padding mask), a buffer, a random op, an in-place update seen by others, an op the
algebra does not model.

Classification (`classify`). The mask's axes are aligned right to SDPA's [b, h, q, kv]. Every relation is
brought to the normal form `kv ≤ X` or `kv ≥ X` (X free of kv; indices are integers, so a < b is a ≤ b − 1,
and kv = X is both bounds). The candidates are read off those bounds: an upper bound X that depends on q gives
causal with qp = X, plus a lower bound qp − w + 1 sliding(w); an upper bound free of q gives non_causal with
qp_last = X; a formula that is simply True is non_causal over every key. A candidate is accepted only when
`satisfiable(Xor(mask, candidate))` is False, relations with the same normal form being the same proposition.
A causal or sliding qp must be the query's own position: bottom-right (q + Sk − Sq) or without a constant
offset (a position tensor entry, q itself) — a mask that shows keys past that (a non-causal window) is custom.

Soundness and limits. Treating the normalized relations as independent propositions is a relaxation: a proof
over it holds over the integers, so an accepted kind is exact. It is incomplete: masks equal only through
arithmetic between different relations (kv ≤ q ∧ kv ≤ q + 3), or through bounds that hold on the index ranges
only (kv ≤ Sk − 1 as a literal relation), are not proven and stay custom.
"""

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from sympy.logic.inference import satisfiable

from .fx_utils import is_call, meta_val, node_arg, sym_expr, tensor_meta

aten, prims = torch.ops.aten, torch.ops.prims

IDX = tuple(sympy.Symbol(f"_i{k}", integer=True, nonnegative=True) for k in range(8))
B, H, Q, KV = sympy.symbols("b h q kv", integer=True, nonnegative=True)
# An additive mask entry at or below this hides the key: -inf, finfo(float32/bfloat16).min, and -65504 — the value
# torch's CUDA SDPA writes for a hidden key when it turns a bool mask into cuDNN's additive bias (bf16/fp16 on
# H100), which is what canonicalize.sdpa hands us back. Exact: after the row max is subtracted a hidden logit is
# ≤ −65504 + (visible − hidden scores), and exp of anything below −104 is 0 in fp32, unless a visible score is
# itself below about −65 000.
MASKED_FLOAT = -65504.0
RANDOM = (aten.rand, aten.rand_like, aten.randn, aten.randn_like, aten.randint, aten.randint_like, aten.bernoulli,
          aten.randperm, aten.normal, aten.uniform)


class NotIndexArithmetic(Exception):
    """The mask is not a pure function of indices, sizes and position tensors; the message says why."""


@dataclass(frozen=True)
class SymTensor:
    value: sympy.Basic      # Boolean for bool tensors, an Expr otherwise; in the symbols IDX[:ndim]
    shape: tuple            # sympy sizes
    is_bool: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)


def shifted(value, by: int):
    """Renumber index symbols i_k → i_(k+by) (broadcasting aligns axes from the right)."""
    return value.xreplace({IDX[k]: IDX[k + by] for k in range(len(IDX) - max(by, 0))}) if by else value


def is_boolean(value) -> bool:
    """A truth value (sympy Symbols are Booleans too, so test the kinds of boolean expression)."""
    boolalg = sympy.logic.boolalg
    return isinstance(value, (boolalg.BooleanAtom, boolalg.BooleanFunction, sympy.core.relational.Relational))


def as_number(value):
    return sympy.Piecewise((1, value), (0, True)) if is_boolean(value) else value


def as_bool(value):
    return value if is_boolean(value) else sympy.Ne(value, 0)


def python_scalar(x):
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, (int, float)):
        return sympy.sympify(x)
    return None


class MaskEvaluator:
    """Evaluates nodes to SymTensors (memoized); raises NotIndexArithmetic with the reason it cannot."""

    def __init__(self):
        self.values: dict[fx.Node, SymTensor] = {}

    def __call__(self, node: fx.Node) -> SymTensor:
        if node not in self.values:
            self.values[node] = self._finish(node, self._evaluate(node))
        return self.values[node]

    # ---- plumbing
    def _finish(self, node, value) -> SymTensor:
        val = tensor_meta(node)
        shape = tuple(sym_expr(s) for s in val.shape)
        value = sympy.sympify(value).xreplace({IDX[k]: sympy.S.Zero for k, size in enumerate(shape) if size == 1})
        return SymTensor(value, shape, val.dtype == torch.bool)

    def scalar(self, x):
        """A python scalar, SymInt node or 0-d tensor node as a sympy value."""
        if (value := python_scalar(x)) is not None:
            return value
        if isinstance(x, fx.Node) and not isinstance(meta_val(x), torch.Tensor):
            value = sym_expr(x)
            if value is None:
                raise NotIndexArithmetic(f"reads the non-integer scalar {x.name}")
            return value
        raise NotIndexArithmetic(f"uses {x!r} where a scalar was expected")

    def operand(self, x, ndim: int):
        """x's value with its axes aligned right into an ndim-dimensional result."""
        if isinstance(x, fx.Node) and isinstance(meta_val(x), torch.Tensor):
            t = self(x)
            return shifted(t.value, ndim - t.ndim)
        return self.scalar(x)

    # ---- the ops
    def _evaluate(self, node: fx.Node):
        if node.op == "placeholder":
            val = tensor_meta(node)
            if val is None or val.dtype == torch.bool or val.is_floating_point():
                raise NotIndexArithmetic(f"reads the tensor input '{node.name}' (data, not index arithmetic)")
            return sympy.Function(f"{node.name}", integer=True)(*IDX[:val.dim()])
        if node.op == "get_attr":
            raise NotIndexArithmetic(f"reads the tensor '{node.target}' stored on the module")
        if node.op != "call_function" or tensor_meta(node) is None:
            raise NotIndexArithmetic(f"uses {node.name}, which is not a tensor op")
        if is_call(node, *RANDOM):
            raise NotIndexArithmetic(f"is random ({node.target})")
        ndim = tensor_meta(node).dim()
        for ops, handler in HANDLERS:
            if is_call(node, *ops):
                return handler(self, node, ndim)
        raise NotIndexArithmetic(f"uses {node.target}, which the mask algebra does not model")

    def arange(self, node, ndim):
        args = [self.scalar(a) for a in node.args]
        start, step = (args[0] if len(args) > 1 else 0), (args[2] if len(args) > 2 else 1)
        return start + step * IDX[0]

    def arithmetic(self, node, ndim):
        a, b = (self.operand(x, ndim) for x in node.args[:2])
        alpha = self.scalar(node.kwargs.get("alpha", 1))
        if is_call(node, aten.mul):
            return sympy.And(a, b) if node_is_bool(node) else as_number(a) * as_number(b)
        if is_call(node, aten.rsub):
            a, b = b, a
        sign = -1 if is_call(node, aten.sub, aten.rsub) else 1
        if node_is_bool(node):
            raise NotIndexArithmetic(f"adds booleans ({node.target})")
        return as_number(a) + sign * alpha * as_number(b)

    def neg(self, node, ndim):
        return -as_number(self.operand(node.args[0], ndim))

    def compare(self, node, ndim):
        a, b = (self.operand(x, ndim) for x in node.args[:2])
        if is_call(node, aten.eq, aten.ne) and is_boolean(a):
            same = sympy.Equivalent(a, as_bool(b))
            return same if is_call(node, aten.eq) else sympy.Not(same)
        return COMPARISONS[node.target.overloadpacket](as_number(a), as_number(b))

    def logical(self, node, ndim):
        self.check_private_update(node)
        args = [as_bool(self.operand(x, ndim)) for x in node.args[:2]]
        return LOGICAL[node.target.overloadpacket](*args)

    def where(self, node, ndim):
        cond, a, b = (self.operand(x, ndim) for x in node.args[:3])
        if node_is_bool(node):
            return sympy.Or(sympy.And(cond, as_bool(a)), sympy.And(sympy.Not(cond), as_bool(b)))
        return sympy.Piecewise((as_number(a), cond), (as_number(b), True))

    def constant(self, node, ndim):
        if is_call(node, aten.ones, aten.new_ones, aten.ones_like):
            fill = 1
        elif is_call(node, aten.zeros, aten.new_zeros, aten.zeros_like):
            fill = 0
        else:  # full(size, v), full_like(x, v), scalar_tensor(v), new_full(x, size, v)
            position = {"full": 1, "full_like": 1, "scalar_tensor": 0, "new_full": 2}
            fill = node.args[position[node.target.__name__.split(".")[0]]]
        value = self.scalar(fill)
        return as_bool(value) if node_is_bool(node) else as_number(value)

    def cast(self, node, ndim):
        value = self(node.args[0]).value
        if node_is_bool(node):
            return as_bool(value)
        if tensor_meta(node).is_floating_point() or as_number(value).is_integer:
            return as_number(value)
        raise NotIndexArithmetic(f"casts a non-integer value to {tensor_meta(node).dtype}")

    def same_value(self, node, ndim):
        self.check_private_update(node)
        return self(node.args[0]).value

    def unsqueeze(self, node, ndim):
        dim = node.args[1] % ndim
        return self(node.args[0]).value.xreplace({IDX[k]: IDX[k + 1] for k in range(dim, len(IDX) - 1)})

    def reshape(self, node, ndim):
        """Views that only add or drop size-1 axes (squeeze, unsqueeze-like reshapes)."""
        src = self(node.args[0])
        out = tuple(sym_expr(s) for s in tensor_meta(node).shape)
        kept_in = [k for k, s in enumerate(src.shape) if s != 1]
        kept_out = [k for k, s in enumerate(out) if s != 1]
        if [src.shape[k] for k in kept_in] != [out[k] for k in kept_out]:
            raise NotIndexArithmetic(f"reshapes {tuple(src.shape)} to {out}, which regroups elements")
        return src.value.xreplace({IDX[i]: IDX[o] for i, o in zip(kept_in, kept_out)})

    def permute(self, node, ndim):
        if is_call(node, aten.permute):
            dims = [d % ndim for d in node.args[1]]
        else:  # transpose(x, a, b) or t(x)
            dims = list(range(ndim))
            a, b = (node.args[1] % ndim, node.args[2] % ndim) if len(node.args) > 1 else (0, ndim - 1)
            dims[a], dims[b] = dims[b], dims[a]
        return self(node.args[0]).value.xreplace({IDX[d]: IDX[j] for j, d in enumerate(dims)})

    def slice(self, node, ndim):
        src = self(node.args[0])
        dim = node_arg(node, 1, "dim", 0) % ndim
        start = self.position(node_arg(node, 2, "start", None) or 0, src.shape[dim])
        step = self.scalar(node_arg(node, 4, "step", 1))
        return src.value.xreplace({IDX[dim]: start + step * IDX[dim]})

    def select(self, node, ndim):
        src = self(node.args[0])
        dim = node.args[1] % src.ndim
        index = self.position(node.args[2], src.shape[dim])
        value = src.value.xreplace({IDX[dim]: index})
        return value.xreplace({IDX[k]: IDX[k - 1] for k in range(dim + 1, src.ndim)})

    def position(self, x, size):
        """A start/index argument: negative values count from the end of the axis."""
        value = self.scalar(x)
        if value.is_nonnegative:
            return value
        if value.is_negative:
            return value + size
        raise NotIndexArithmetic(f"indexes with {value}, whose sign is unknown")

    def index(self, node, ndim):
        src = self(node.args[0])
        indices = list(node.args[1])
        used = [k for k, ix in enumerate(indices) if ix is not None]
        first, count = used[0], len(used)
        if used != list(range(first, first + count)):
            raise NotIndexArithmetic("indexes with tensors on non-adjacent axes")
        span = ndim - (src.ndim - count)  # the broadcast index block's rank in the result
        mapping = {IDX[k]: IDX[k] for k in range(first)}
        for k in used:
            ix = self(indices[k])
            if ix.is_bool or not ix.value.is_nonnegative:
                raise NotIndexArithmetic(f"indexes with {indices[k].name}, which may be negative or boolean")
            mapping[IDX[k]] = shifted(ix.value, first + span - ix.ndim)
        for k in range(first + count, src.ndim):
            mapping[IDX[k]] = IDX[k - count + span]
        return src.value.xreplace(mapping)

    def diff(self, node, ndim):
        src = self(node.args[0])
        n, dim = node_arg(node, 1, "n", 1), node_arg(node, 2, "dim", -1) % src.ndim
        prepend, append = node_arg(node, 3, "prepend"), node_arg(node, 4, "append")
        i, x = IDX[dim], src.value
        if n != 1 or append is not None:
            raise NotIndexArithmetic("takes a diff other than first differences with a prepend")
        if prepend is None:
            return as_number(x).xreplace({i: i + 1}) - as_number(x)
        step = as_number(x) - as_number(x).xreplace({i: i - 1})
        first = as_number(x).xreplace({i: sympy.S.Zero}) - as_number(self.operand(prepend, src.ndim))
        if sympy.expand(step.xreplace({i: sympy.S.Zero}) - first) != 0:
            raise NotIndexArithmetic("takes a diff whose first element differs from the others")
        return step

    def cat(self, node, ndim):
        """One formula when every piece agrees with the last piece's (cat([p[:1] - 1, p]) of p = arange is
        arange - 1: how AOT graphs spell diff with a prepend), else a Piecewise over the ranges."""
        dim = node_arg(node, 1, "dim", 0) % ndim
        i, offset, pieces = IDX[dim], 0, []
        for part in node.args[0]:
            t = self(part)
            pieces.append((as_number(t.value).xreplace({i: i - offset}), offset, t.shape[dim]))
            offset = offset + t.shape[dim]
        formula = pieces[-1][0]
        if all(agrees(value, formula, i, start, size) for value, start, size in pieces):
            return as_bool(formula) if node_is_bool(node) else formula
        if node_is_bool(node):
            raise NotIndexArithmetic("concatenates boolean pieces of different formulas")
        return sympy.Piecewise(*((v, i < start + size) for v, start, size in pieces[:-1]), (formula, True))

    def cumsum(self, node, ndim):
        dim = node.args[1] % ndim
        value = as_number(self(node.args[0]).value)
        if value.has(IDX[dim]):
            raise NotIndexArithmetic("takes a cumulative sum of a varying value")
        return value * (IDX[dim] + 1)

    def check_private_update(self, node):
        """In-place ops (visible &= …) are values only when nobody else sees the updated tensor."""
        if node.target._schema.is_mutable and len(node.args[0].users) != 1:
            raise NotIndexArithmetic(f"updates {node.args[0].name} in place while others read it")


def agrees(value, formula, i, start, size) -> bool:
    """value equals formula at every index of [start, start + size)."""
    if size == 1:
        at = sympy.sympify(start)
        return sympy.expand(value.xreplace({i: at}) - formula.xreplace({i: at})) == 0
    return sympy.expand(value - formula) == 0


def node_is_bool(node) -> bool:
    return tensor_meta(node).dtype == torch.bool


COMPARISONS = {aten.le: sympy.Le, aten.lt: sympy.Lt, aten.ge: sympy.Ge, aten.gt: sympy.Gt, aten.eq: sympy.Eq,
               aten.ne: sympy.Ne}
LOGICAL = {aten.bitwise_and: sympy.And, aten.__and__: sympy.And, aten.__iand__: sympy.And, aten.logical_and: sympy.And,
           aten.bitwise_or: sympy.Or, aten.__or__: sympy.Or, aten.__ior__: sympy.Or, aten.logical_or: sympy.Or,
           aten.bitwise_xor: sympy.Xor, aten.__xor__: sympy.Xor, aten.logical_xor: sympy.Xor,
           aten.bitwise_not: sympy.Not, aten.logical_not: sympy.Not}
HANDLERS = (
    ((aten.arange,), MaskEvaluator.arange),
    ((aten.add, aten.sub, aten.rsub, aten.mul), MaskEvaluator.arithmetic),
    ((aten.neg,), MaskEvaluator.neg),
    (tuple(COMPARISONS), MaskEvaluator.compare),
    (tuple(LOGICAL), MaskEvaluator.logical),
    ((aten.where,), MaskEvaluator.where),
    ((aten.ones, aten.zeros, aten.full, aten.new_ones, aten.new_zeros, aten.new_full, aten.ones_like,
      aten.zeros_like, aten.full_like, aten.scalar_tensor), MaskEvaluator.constant),
    ((aten.to, aten._to_copy, prims.convert_element_type, aten.type_as), MaskEvaluator.cast),
    ((aten.expand, aten.expand_as, aten.alias, aten.clone, aten.contiguous, aten.lift_fresh_copy, aten.detach),
     MaskEvaluator.same_value),
    ((aten.unsqueeze,), MaskEvaluator.unsqueeze),
    ((aten.view, aten.reshape, aten._unsafe_view, aten.squeeze), MaskEvaluator.reshape),
    ((aten.permute, aten.transpose, aten.t), MaskEvaluator.permute),
    ((aten.slice,), MaskEvaluator.slice),
    ((aten.select,), MaskEvaluator.select),
    ((aten.index,), MaskEvaluator.index),
    ((aten.diff,), MaskEvaluator.diff),
    ((aten.cat,), MaskEvaluator.cat),
    ((aten.cumsum,), MaskEvaluator.cumsum),
)


# ---------------------------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class Kind:
    kind: str                     # non_causal | causal | sliding
    qp: sympy.Expr | None         # causal/sliding: qp(b, q); non_causal: qp_last(b); None = bottom-right
    window: int = 0


class NotProven(Exception):
    """No kind is proven equal to the mask; the message says what the mask is."""


def visibility(t: SymTensor) -> sympy.logic.boolalg.Boolean:
    """The mask as 'key visible' over [b, h, q, kv]; an additive float mask must be 0 / -inf valued."""
    names = (B, H, Q, KV)[4 - t.ndim:] if t.ndim <= 4 else None
    if names is None:
        raise NotProven(f"the mask has {t.ndim} dimensions")
    value = t.value.xreplace(dict(zip(IDX, names)))
    if t.is_bool:
        return value
    pieces = value.args if isinstance(value, sympy.Piecewise) else ((value, sympy.true),)
    visible, earlier = sympy.false, sympy.false
    for v, cond in pieces:
        here = sympy.And(cond, sympy.Not(earlier))
        if v.is_zero:
            visible = sympy.Or(visible, here)
        elif not (v.is_number and bool(v <= MASKED_FLOAT)):
            raise NotProven(f"the additive mask takes the value {v}, not only 0 and -inf")
        earlier = sympy.Or(earlier, cond)
    return visible


def kv_bound(rel) -> tuple[str, sympy.Expr] | None:
    """('le', X) for kv ≤ X, ('ge', X) for kv ≥ X, None when rel is not ±kv + (integer, kv-free) vs 0."""
    d = sympy.expand(rel.lhs - rel.rhs)
    c = d.coeff(KV)
    rest = sympy.expand(d - c * KV)
    if c not in (1, -1) or rest.has(KV) or not rest.is_integer:
        return None
    strict = 1 if isinstance(rel, (sympy.StrictLessThan, sympy.StrictGreaterThan)) else 0
    if isinstance(rel, (sympy.LessThan, sympy.StrictLessThan)):   # d ≤ −strict
        return ("le", -rest - strict) if c == 1 else ("ge", rest + strict)
    return ("ge", -rest + strict) if c == 1 else ("le", rest - strict)  # d ≥ strict


class Propositions:
    """Maps relations to propositional symbols; relations with the same kv normal form share one."""

    def __init__(self):
        self.symbols: dict = {}
        self.bounds: list[tuple[str, sympy.Expr]] = []

    def atom(self, key):
        if key not in self.symbols:
            self.symbols[key] = sympy.Symbol(f"p{len(self.symbols)}")
            if key[0] in ("le", "ge"):
                self.bounds.append(key)
        return self.symbols[key]

    def encode(self, e):
        if e in (sympy.true, sympy.false):
            return e
        if isinstance(e, (sympy.Eq, sympy.Ne)):
            le, ge = kv_bound(sympy.Le(e.lhs, e.rhs)), kv_bound(sympy.Ge(e.lhs, e.rhs))
            both = sympy.And(self.atom(le), self.atom(ge)) if le and ge else self.atom(("rel", sympy.Eq(e.lhs, e.rhs)))
            return both if isinstance(e, sympy.Eq) else sympy.Not(both)
        if isinstance(e, sympy.core.relational.Relational):
            return self.atom(kv_bound(e) or ("rel", e))
        if isinstance(e, sympy.logic.boolalg.BooleanFunction):
            return e.func(*(self.encode(a) for a in e.args))
        raise NotProven(f"the mask contains {e}, which is not a relation of indices")


def classify(visible: sympy.logic.boolalg.Boolean, sq, sk) -> Kind:
    """The kind proven equal to `visible` (over b, h, q, kv; sizes sq, sk as sympy), or NotProven."""
    if visible.has(H):
        raise NotProven(f"the mask differs per head: {visible}")
    props = Propositions()
    mask = props.encode(visible)
    bottom_right = Q + sk - sq

    def equal(candidate) -> bool:
        return not satisfiable(sympy.Xor(mask, candidate))

    if equal(sympy.true):
        return Kind("non_causal", None)
    for side, upper in list(props.bounds):
        if side != "le":
            continue
        if not upper.has(Q):
            if equal(props.atom(("le", upper))):
                return Kind("non_causal", None if sympy.expand(upper - (sk - 1)) == 0 else upper)
            continue
        shift = sympy.expand(upper - bottom_right)
        if shift != 0 and upper.as_coeff_Add()[0] != 0:
            continue  # keys past the query's own position are visible: not causal
        qp = None if shift == 0 else upper
        if equal(props.atom(("le", upper))):
            return Kind("causal", qp)
        for side2, lower in list(props.bounds):
            width = sympy.expand(upper - lower)
            if side2 == "ge" and width.is_Integer and width >= 0 and \
                    equal(sympy.And(props.atom(("le", upper)), props.atom(("ge", lower)))):
                return Kind("sliding", qp, int(width) + 1)
    raise NotProven(f"the mask {visible} is not provably causal, sliding or non_causal")
