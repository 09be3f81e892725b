"""The `torch.compile(model, backend="dflash")` entry point (registered in pyproject under
`torch_dynamo_backends`, so it resolves without importing torch_dflash first).

Today it runs the Dynamo graph it is given unchanged; the pass pipeline and lowering plug in here.
"""

import torch


def dflash_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    return gm.forward
