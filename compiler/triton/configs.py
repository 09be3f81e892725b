"""Launch configurations per kernel and target family, in one table.

Keys: kernel name -> family ('cuda': warp 32, sm_80/sm_90; 'rocm': wavefront 64, gfx942/gfx950) -> params.
Kernel modules read their row with `launch_config(kernel, family)`; edit the numbers here, nowhere else.
"""

TABLE: dict[str, dict[str, dict[str, int]]] = {
    # rows are added by the kernel modules' authors: "kernel_name": {"cuda": {...}, "rocm": {...}},
}


def launch_config(kernel: str, family: str) -> dict[str, int]:
    try:
        return TABLE[kernel][family]
    except KeyError:
        raise KeyError(f"no launch config for kernel {kernel!r} on {family!r}; add a row to configs.TABLE") from None
