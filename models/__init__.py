"""torch_dflash.models — plain PyTorch reference models and checkpoint loading."""
