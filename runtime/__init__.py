"""torch_dflash.runtime — the DFLASH speculative-decoding engine."""
