"""torch_dflash.passes — FX graph passes over ATen graphs, one pass per file."""
