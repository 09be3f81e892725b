"""The compile cache of `backend="dflash"`: what OUR part (pass pipeline + lowering) made of one AOT graph, so a
second process compiling the same model skips the passes. Inductor then compiles the identical graph, so its own
FX-graph cache hits as well.

key    sha256 of the frozen AOT graph's code; every input's and constant's shape (concrete or symbolic: the
       token dimension fixes the DFLASH block size, so block 8 and block 16 never share an entry), stride,
       dtype and device, and the ranges of the shape symbols; the source of the passes, the lowering, the
       providers and kernels; the options (less `report` and `cache`); the resolved target and what decides
       the provider choice there; the torch / triton / torch-dflash versions.
entry  <dir>/<key>.bin = MAGIC + format version + sha256(payload) + payload, written atomically. The payload
       pickles the rewritten graph WITHOUT weights (torch.fx GraphPickler, no node metadata), a recipe per
       constant over the frozen parameters (passes.fx_utils.build_constant), the provider ops the graph calls
       and the CompileReport. A hit replays the recipes against the live parameters.
A corrupt, truncated or foreign entry is logged as one warning, rebuilt and overwritten; a graph whose
constants cannot be expressed as recipes is not cached (one info line says why).
"""

import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

from torch_dflash.passes.fx_utils import attr_tensor, build_constant, recipe_of

from . import lowering, providers, report
from .ops import OP_NAMES

log = logging.getLogger("torch_dflash")

MAGIC = b"torch-dflash compile cache\n"
FORMAT = 1
_SOURCES = ("lowering.py", "providers.py", "backend.py", "report.py", "compile_cache.py", "ops/*.py",
            "triton/*.py", "ascend/*.py")


class Unusable(Exception):
    """An entry that cannot be used (damaged, another format, another key) or a graph that cannot be cached."""


def cache_dir(options) -> Path | None:
    """Where entries live: $TORCH_DFLASH_CACHE_DIR, else $XDG_CACHE_HOME/torch_dflash (~/.cache/torch_dflash);
    None when `options.cache` is False or TORCH_DFLASH_CACHE_DISABLE=1."""
    if not options.cache or os.environ.get("TORCH_DFLASH_CACHE_DISABLE") == "1":
        return None
    if os.environ.get("TORCH_DFLASH_CACHE_DIR"):
        return Path(os.environ["TORCH_DFLASH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_dflash"


@functools.cache
def source_hash() -> str:
    """sha256 over the source of every pass module, the lowering, the providers, the op library and kernels."""
    from torch_dflash import passes

    compiler = Path(__file__).parent
    files = sorted(Path(passes.__file__).parent.glob("*.py"))
    files += [path for pattern in _SOURCES for path in sorted(compiler.glob(pattern))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _versions() -> dict:
    try:
        import triton
    except ImportError:
        triton = None
    try:
        ours = importlib.metadata.version("torch-dflash")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree: the source hash covers it
        ours = None
    return {"torch": torch.__version__, "triton": getattr(triton, "__version__", None), "torch_dflash": ours}


def _provider_facts(target: str) -> dict:
    """What the lowering's provider choice depends on besides the graph: the providers of the target, the ones
    that could not be imported, the Triton interpreter switch, the GPU or the Ascend packages."""
    facts = {"missing": lowering.load_providers(target), "interpret": os.environ.get("TRITON_INTERPRET", ""),
             "providers": {op: [f"{p.name}:{p.priority}" for p in providers.candidates(op, target)]
                           for op in OP_NAMES}}
    if target in ("cuda", "rocm") and torch.cuda.is_available():
        facts["device"] = [torch.cuda.get_device_name(), *torch.cuda.get_device_capability()]
    if target == "ascend":
        facts["npu"] = [importlib.util.find_spec(m) is not None for m in ("torch_npu", "sgl_kernel_npu")]
    return facts


def _describe(value, ranges: dict) -> str:
    """dtype, device, shape and stride of a tensor (SymInts printed as their expressions, their symbols' ranges
    collected into `ranges`); repr of anything else."""
    if not isinstance(value, torch.Tensor):
        sizes, text = (value,), repr(value)
    else:
        sizes = (*value.shape, *value.stride())
        text = f"{value.dtype} {value.device} {[str(s) for s in value.shape]} {[str(s) for s in value.stride()]}"
    for size in sizes:
        if isinstance(size, torch.SymInt):
            for symbol in size.node.expr.free_symbols:
                ranges[str(symbol)] = str(size.node.shape_env.var_to_range.get(symbol))
    return text


def graph_key(gm: fx.GraphModule, options, target: str) -> str:
    """The cache key of the frozen AOT graph `gm` compiled with `options` for `target` (see the module doc)."""
    ranges: dict[str, str] = {}
    inputs = [_describe(n.meta.get("val"), ranges) for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {n.target: _describe(attr_tensor(gm, n), ranges) for n in gm.graph.nodes if n.op == "get_attr"}
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("report", "cache")}
    key = {"format": FORMAT, "code": gm.code, "inputs": inputs, "constants": constants, "ranges": ranges,
           "sources": source_hash(), "options": opts, "target": target, "providers": _provider_facts(target),
           "versions": _versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# ---- the entry file -----------------------------------------------------------------------------------------------
def _write(path: Path, entry: dict) -> None:
    payload = pickle.dumps(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + bytes([FORMAT]) + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path: Path, key: str) -> dict | None:
    """The entry stored under `key`, None when there is none; raises Unusable when the file is damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 33:
        raise Unusable("not a torch-dflash cache entry (or truncated)")
    if data[len(MAGIC)] != FORMAT:
        raise Unusable(f"format version {data[len(MAGIC)]}, this torch-dflash reads {FORMAT}")
    digest, payload = data[len(MAGIC) + 1:len(MAGIC) + 33], data[len(MAGIC) + 33:]
    if hashlib.sha256(payload).digest() != digest:
        raise Unusable("checksum mismatch (truncated or damaged)")
    entry = pickle.loads(payload)
    if not isinstance(entry, dict) or entry.get("key") != key:
        raise Unusable("it holds another key")
    return entry


# ---- graph <-> entry ----------------------------------------------------------------------------------------------
def _attr_leaves(recipe: tuple):
    kind, *args = recipe
    if kind == "attr":
        yield args[0]
    elif kind in ("rows", "zeros"):
        yield from _attr_leaves(args[0])
    elif kind == "cat":
        for part in args[0]:
            yield from _attr_leaves(part)


def _recipes(gm: fx.GraphModule, originals: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """A recipe over the pre-pass tensors `originals` for every constant the rewritten graph reads."""
    recipes = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        recipe, value = recipe_of(gm, node), attr_tensor(gm, node)
        if value is None:
            raise Unusable(f"'{node.target}' is not a tensor")
        if recipe[0] == "attr" and value is not originals.get(node.target):
            raise Unusable(f"'{node.target}' is not a tensor of the input graph and was built without a recipe")
        missing = [leaf for leaf in _attr_leaves(recipe) if leaf not in originals]
        if missing:
            raise Unusable(f"the recipe of '{node.target}' reads '{missing[0]}', which the input graph lacks")
        recipes[node.target] = recipe
    return recipes


def _pickle_graph(gm: fx.GraphModule) -> bytes:
    """gm's graph without node metadata, its constants replaced by empty meta tensors."""
    from torch.fx._graph_pickler import GraphPickler, Options

    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:  # fake values, stack traces: Inductor traces the graph again anyway
        node.meta = {}
    skeleton = {n.target: attr_tensor(gm, n).to("meta") for n in gm.graph.nodes if n.op == "get_attr"}
    return GraphPickler.dumps(fx.GraphModule(skeleton, graph), Options(ops_filter=None))


def _provider_ops(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(op, provider) of every `dflash_<provider>::<op>` the lowered graph calls."""
    return sorted({(n.target._opname, n.target.namespace.removeprefix("dflash_")) for n in gm.graph.nodes
                   if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace.startswith("dflash_")})


def _load_graph(entry: dict, target: str) -> fx.Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler

    lowering.load_providers(target)
    for op, provider in entry["provider_ops"]:  # the lowered graph's ops must exist before unpickling
        lowering.provider_op(op, provider)
    return GraphPickler.loads(entry["graph"], FakeTensorMode()).graph


def _code(graph: fx.Graph) -> str:
    return graph.python_code("self").src


def _rebuild(entry: dict, gm: fx.GraphModule, target: str) -> fx.GraphModule:
    """The cached rewritten graph over gm's live tensors."""
    graph = _load_graph(entry, target)
    if [n.name for n in graph.nodes if n.op == "placeholder"] != \
            [n.name for n in gm.graph.nodes if n.op == "placeholder"]:
        raise Unusable("its graph takes other inputs")
    return fx.GraphModule({name: build_constant(gm, r) for name, r in entry["constants"].items()}, graph)


def _entry(gm: fx.GraphModule, key: str, originals: dict, target: str, compile_report) -> dict:
    entry = {"key": key, "constants": _recipes(gm, originals), "provider_ops": _provider_ops(gm),
             "report": dataclasses.asdict(compile_report)}
    try:
        entry["graph"] = _pickle_graph(gm)
        survived = _code(_load_graph(entry, target)) == _code(gm.graph)
    except Exception as error:  # an op or argument GraphPickler cannot carry
        raise Unusable(f"the graph does not serialize ({type(error).__name__}: {error})") from error
    if not survived:
        raise Unusable("the graph reads back differently")
    return entry


def rewrite(gm: fx.GraphModule, graph_pass) -> fx.GraphModule:
    """gm (a frozen AOT graph) after `graph_pass` (backend.DFlashGraphPass): taken from the cache when it holds
    this graph, else computed and stored. Publishes the CompileReport with `cache` set to hit, miss, rebuilt
    (a damaged entry was replaced), skipped (not cacheable, or unwritable) or off."""
    root = cache_dir(graph_pass.options)
    if root is None:
        _publish(graph_pass, graph_pass.run(gm), "off", "")
        return gm
    key = graph_key(gm, graph_pass.options, graph_pass.target)
    path, status = root / f"{key}.bin", "miss"
    try:
        entry = _read(path, key)
        if entry is not None:
            rebuilt = _rebuild(entry, gm, graph_pass.target)
            log.info("%s compile cache hit %s", graph_pass.graph_name, path)
            _publish(graph_pass, report.CompileReport(**entry["report"]), "hit", key)
            return rebuilt
    except Exception as error:  # whatever is wrong with the entry, the passes rebuild it: never a crash
        log.warning("torch_dflash compile cache: unusable entry %s (%s: %s); rebuilding it", path,
                    type(error).__name__, error)
        status = "rebuilt"
    originals = {n.target: attr_tensor(gm, n) for n in gm.graph.nodes if n.op == "get_attr"}
    compile_report = graph_pass.run(gm)
    try:
        _write(path, _entry(gm, key, originals, graph_pass.target, compile_report))
    except (Unusable, OSError) as error:
        log.info("%s not cached: %s", graph_pass.graph_name, error)
        status = "skipped"
    _publish(graph_pass, compile_report, status, key)
    return gm


def _publish(graph_pass, compile_report, status: str, key: str) -> None:
    compile_report.graph, compile_report.cache, compile_report.cache_key = graph_pass.graph_name, status, key[:16]
    graph_pass.publish(compile_report)
