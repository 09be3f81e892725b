"""`backend="dflash"` resolves through the `torch_dynamo_backends` entry point in pyproject, in a fresh
interpreter that never imports torch_dflash itself."""

import subprocess
import sys
import textwrap

FRESH_INTERPRETER = textwrap.dedent("""
    import sys
    import torch
    import torch._dynamo

    assert "dflash" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
    assert "torch_dflash" not in sys.modules, "listing the backends should not import torch_dflash"

    def fn(x, y):
        return torch.nn.functional.gelu(x @ y) + x.sum(-1, keepdim=True)

    x, y = torch.randn(5, 7), torch.randn(7, 7)
    out = torch.compile(fn, backend="dflash")(x, y)
    torch.testing.assert_close(out, fn(x, y))

    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters
    from torch_dflash.compiler.backend import dflash_backend
    assert lookup_backend("dflash") is dflash_backend, "the entry point resolved to another callable"
    assert counters["frames"]["ok"] >= 1, "Dynamo compiled no frame: the backend was never used"
    print("ok")
""")


def test_dflash_backend_resolves_through_entry_point_in_fresh_interpreter():
    run = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("ok")
