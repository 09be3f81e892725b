"""What a benchmark case is. Kernel and step modules return a list of `Case`s; the harness times them.

A case holds zero-argument callables over inputs it made once (fresh random data, never zeros), one per
variant ('eager', 'inductor', 'dflash', 'zlab', ...), a `check` that raises if the dflash variant disagrees
with the reference (it may return a string of what it measured, shown in the table's notes), and the floor: the bytes that must cross HBM at least once (read + written) and/or the
FLOPs that must be done, from which the harness derives a time floor with the measured ceilings.
"""

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Case:
    suite: str                                  # "kernels" | "steps" | "e2e"
    name: str                                   # "qkv_norm_rope T=8192"
    variants: dict[str, Callable[[], object]]
    check: Callable[[], str | None]
    floor_bytes: int = 0
    floor_flops: int = 0
    use_cuda_graph: bool = False                # small, launch-bound cases are timed as graph replays
    notes: str = ""
    extra: dict = field(default_factory=dict)
