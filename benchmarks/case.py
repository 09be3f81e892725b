"""What a benchmark case is. Kernel and step modules return a list (or a generator) of `Case`s; the harness times
them one at a time and drops each after it ran, which frees its inputs.

A case holds zero-argument callables over inputs it made (fresh random data, never zeros), one per variant
('eager', 'inductor', 'dflash', 'zlab', ...), a `check` that raises if the dflash variant disagrees with the
reference (it may return a string of what it measured, shown in the table's notes), and the floor: the bytes that
must cross HBM at least once (read + written) and/or the FLOPs that must be done, from which the harness derives
a time floor with the measured ceilings.

A memory-bound case whose inputs would stay in L2 between timed calls reads them through a `Rotation`: its
variants read `rotation.current`, and the harness makes enough input sets that every timed call reads cold data.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch


class Rotation:
    """Input sets that a case's variants read through `current` at call time. Set 0 is made at once: the check,
    tests and untimed calls use it. The harness `grow`s fresh sets (from `make`, never copies), `use`s one before
    each timed call or before capturing that set's CUDA graph, and `shrink`s back to set 0 after timing."""

    def __init__(self, make: Callable[[], tuple]):
        self.make = make
        self.sets = [tuple(make())]
        self.current = self.sets[0]

    def set_bytes(self) -> int:
        """Bytes of one set (tensors sharing storage, e.g. a cache and its valid-prefix view, counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in self.sets[0] if isinstance(t, torch.Tensor)}
        return sum(storages.values())

    def grow(self, count: int) -> None:
        while len(self.sets) < count:
            self.sets.append(tuple(self.make()))

    def use(self, index: int) -> None:
        self.current = self.sets[index]

    def shrink(self) -> None:
        del self.sets[1:]
        self.current = self.sets[0]


KERNEL_GRAPH_CALLS = 20     # calls per CUDA graph of the kernel cases (Case.graph_calls)


@dataclass
class Case:
    suite: str                                  # "kernels" | "steps" | "e2e"
    name: str                                   # "qkv_norm_rope T=8192"
    variants: dict[str, Callable[[], object]]
    check: Callable[[], str | None]
    floor_bytes: int = 0
    floor_flops: int = 0
    use_cuda_graph: bool = False                # small, launch-bound cases are timed as graph replays
    graph_calls: int = 1                        # > 1: each graph holds max(graph_calls, input sets) calls back to
                                                # back and the time is per call — the GPU's time for the call as
                                                # it runs inside a step, without the host's launch of the graph
    per_call: int = 1                           # iterations of what the case names in one timed call (the e2e
                                                # turns: a run of consecutive turns); times are per iteration
    host_ahead: bool = False                    # each call timed behind a GPU-side lead, its host work submitted
                                                # before the GPU reaches it (a step's GPU time, as in the runtime's
                                                # loop); the notes add each variant's synchronous call time
    notes: str = ""
    extra: dict = field(default_factory=dict)
    rotation: Rotation | None = None            # memory-bound cases: the inputs the variants read, rotated
    follow_up: bool = False                     # replays what the case before it built (seconds): runs even once
                                                # --budget is spent, so a compiled case never loses its graph row
