"""The compile cache of backend="dflash" (compiler/compile_cache.py): a second process hits and matches eager with
other weights, a changed pass file misses, a damaged entry is rebuilt, options and token counts get their own
entries, and the switches turn it off."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiny_models
import torch_dflash as td
from torch_dflash.compiler import compile_cache

# One process compiling our 1-layer DecoderLM (weights from argv seed) and checking it against eager. Target cuda
# with the Triton kernels in the interpreter on CPU tensors (TRITON_INTERPRET=1, on any machine): the lowered graph
# calls dflash_triton ops, which a hit must register before it unpickles the graph.
PROCESS = textwrap.dedent("""
    import sys
    import torch
    import torch_dflash
    from torch_dflash.models import DecoderConfig, DecoderLM

    tree, report, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert torch_dflash.__file__.startswith(tree), torch_dflash.__file__
    assert torch_dflash.passes.__file__.startswith(tree), torch_dflash.passes.__file__
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    model.setup_cache(2, 16)
    options = {"target": "cuda", "inductor": False, "report": report}
    fast = torch.compile(model, backend="dflash", dynamic=False, options=options)
    ids, positions = torch.randint(0, 128, (2, 6)), torch.arange(6).expand(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, positions=positions).logits, model(ids, positions=positions).logits,
                                   atol=1e-5, rtol=1e-5)
    print("ok")
""")


def _package_tree(root: Path) -> Path:
    """A copy of the imported torch_dflash package in the layout it is installed in (subpackages under it)."""
    ignore = shutil.ignore_patterns("__pycache__")
    package = root / "torch_dflash"
    shutil.copytree(Path(td.__file__).parent, package, ignore=ignore, dirs_exist_ok=True)
    for sub in ("compiler", "passes", "runtime", "models", "benchmarks"):
        source = importlib.util.find_spec(f"torch_dflash.{sub}").submodule_search_locations[0]
        shutil.copytree(source, package / sub, ignore=ignore, dirs_exist_ok=True)
    return root


def _process(tree: Path, cache: Path, report: Path, seed: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_DFLASH_CACHE_DIR": str(cache), "TRITON_INTERPRET": "1"}
    env.pop("TORCH_DFLASH_CACHE_DISABLE", None)
    run = subprocess.run([sys.executable, "-c", PROCESS, str(tree), str(report), str(seed)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def first_process(tmp_path_factory):
    """A frozen copy of the package (its sources cannot change under the test) and the cache one process filled."""
    root = tmp_path_factory.mktemp("cache_processes")
    tree, cache = _package_tree(root / "tree"), root / "cache"
    return tree, cache, _process(tree, cache, root / "first.json", seed=1)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.bin"))


def test_second_process_hits_with_its_own_weights(first_process, tmp_path):
    tree, cache, first = first_process
    assert first["cache"] == "miss" and len(_entries(cache)) == 1
    second = _process(tree, cache, tmp_path / "second.json", seed=2)   # other weights, same key: recipes replay
    assert second["cache"] == "hit" and second["cache_key"] == first["cache_key"]
    assert second["fusions"]["qkv_norm_rope"] == 1 and second["fusions"]["attention.causal"] == 1
    assert second["providers"]["qkv_norm_rope"] == ["triton"]
    assert second["fusions"] == first["fusions"] and len(_entries(cache)) == 1


def test_a_changed_pass_file_misses(first_process, tmp_path):
    tree, cache, first = first_process
    changed = _package_tree(tmp_path / "tree")
    with open(changed / "torch_dflash" / "passes" / "cleanup.py", "a") as f:
        f.write("# a comment changes the source hash\n")
    result = _process(changed, cache, tmp_path / "changed.json", seed=1)
    assert result["cache"] == "miss" and result["cache_key"] != first["cache_key"]
    assert result["fusions"]["qkv_norm_rope"] == 1 and len(_entries(cache)) == 2


# ---- in this process ---------------------------------------------------------------------------------------------
def _compile_qwen3(ids, **options):
    torch._dynamo.reset()
    model = tiny_models.hf_causal_lm("qwen3", num_hidden_layers=1)
    fast = torch.compile(model, backend="dflash", dynamic=False, options={"inductor": False, **options})
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)
    return td.last_report()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_DFLASH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_DFLASH_CACHE_DISABLE", raising=False)
    return tmp_path / "cache"


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _flipped(data: bytes) -> bytes:
    return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]


def _bad_pickle(data: bytes) -> bytes:   # a well-formed header whose checksum matches a payload that is no pickle
    import hashlib

    payload = b"not a pickle"
    return compile_cache.MAGIC + bytes([compile_cache.FORMAT]) + hashlib.sha256(payload).digest() + payload


def _other_format(data: bytes) -> bytes:
    i = len(compile_cache.MAGIC)
    return data[:i] + bytes([compile_cache.FORMAT + 1]) + data[i + 1:]


def test_a_damaged_entry_is_rebuilt_with_one_warning(cache_dir, caplog):
    ids = torch.randint(0, 128, (1, 6))
    first = _compile_qwen3(ids)
    assert first.cache == "miss"
    key = first.cache_key
    [entry] = _entries(cache_dir)
    for damage in (_truncated, _flipped, _bad_pickle, _other_format):
        entry.write_bytes(damage(entry.read_bytes()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="torch_dflash"):
            report = _compile_qwen3(ids)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage(), damage.__name__
        assert report.cache == "rebuilt" and report.cache_key == key and report.fusions["qkv_norm_rope"] == 1
        assert _entries(cache_dir) == [entry]
        assert compile_cache._read(entry, entry.stem)["key"] == entry.stem, f"{damage.__name__}: not rewritten"


def test_block_sizes_and_options_get_their_own_entries(cache_dir):
    """The z-lab draft at block 4 and 8 (static shapes): two keys, and each hit runs its own block's graph."""
    model = tiny_models.zlab_draft(layers=1)
    blocks = {4: tiny_models.zlab_step(6, block=4), 8: tiny_models.zlab_step(6, block=8)}

    def compile_block(block, **options):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="dflash", dynamic=False, options={"inductor": False, **options})
        with torch.no_grad():
            torch.testing.assert_close(fast(**blocks[block]), model(**blocks[block]), atol=1e-5, rtol=1e-5)
        return td.last_report()

    first = {block: compile_block(block) for block in blocks}
    assert [r.cache for r in first.values()] == ["miss", "miss"] and first[4].cache_key != first[8].cache_key
    assert all(r.fusions["kv_materialize"] == 1 for r in first.values())
    again = {block: compile_block(block) for block in blocks}
    assert {b: (r.cache, r.cache_key) for b, r in again.items()} == {b: ("hit", r.cache_key) for b, r in first.items()}
    disabled = compile_block(4, disable=("kv_materialize",))
    assert disabled.cache == "miss" and disabled.cache_key not in (first[4].cache_key, first[8].cache_key)
    assert "kv_materialize" not in disabled.fusions and len(_entries(cache_dir)) == 3


def test_the_switches_turn_the_cache_off(cache_dir, monkeypatch):
    ids = torch.randint(0, 128, (1, 6))
    by_option = _compile_qwen3(ids, cache=False)
    assert by_option.cache == "off" and by_option.fusions["qkv_norm_rope"] == 1
    monkeypatch.setenv("TORCH_DFLASH_CACHE_DISABLE", "1")
    by_env = _compile_qwen3(ids)
    assert by_env.cache == "off" and by_env.fusions["qkv_norm_rope"] == 1
    assert not cache_dir.exists()
