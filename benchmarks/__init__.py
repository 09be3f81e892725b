"""The GPU benchmark harness (`torch-dflash bench`) and its cases."""
