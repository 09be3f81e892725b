"""Everything device-specific in the runtime: the loop's event-based phase clock and CUDA-graph replay."""

import time

import torch


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


class PhaseClock:
    """The engine loop's phase times, charged to GenerateStats fields. On CUDA each boundary is an event recorded
    on the current stream and the laps are read off the GPU's timeline at `settle`, which the loop calls after the
    synchronisation it makes anyway (the turn's `.tolist()`): timing the phases adds no host synchronisation, so
    the host queues the next phase while the GPU runs this one. On CPU, perf_counter laps."""

    def __init__(self, device):
        self.cuda = is_cuda(device)
        self.last = self._mark()
        self.pending = ()   # (stats, field, start event, end event) charged, not yet added; a tuple: forks copy it

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def charge(self, stats, field: str) -> None:
        """Add the time since the previous boundary (or the clock's creation) to stats.<field>: now on CPU, at the
        next `settle` on CUDA."""
        now = self._mark()
        if self.cuda:
            self.pending = (*self.pending, (stats, field, self.last, now))
        else:
            setattr(stats, field, getattr(stats, field) + now - self.last)
        self.last = now

    def settle(self, wait: bool = True) -> None:
        """Add the pending laps — waiting for the last boundary's event if the caller has not synchronised, or, with
        wait=False, only the laps the GPU has finished (the rest stay pending: a draft queued ahead)."""
        laps = list(self.pending)
        while laps:
            stats, field, start, end = laps[0]
            if not wait and not end.query():
                break
            end.synchronize()
            setattr(stats, field, getattr(stats, field) + start.elapsed_time(end) / 1e3)
            laps.pop(0)
        self.pending = tuple(laps)


def copy_to_host(tensor: torch.Tensor):
    """(a host copy of tensor being made, a call that waits until it is made): on CUDA a pinned copy behind an
    event, so the stream can take more work before the host waits; on CPU the tensor itself."""
    if not is_cuda(tensor.device):
        return tensor, lambda: None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    made = torch.cuda.Event()
    made.record()
    return host, made.synchronize


SMALL_INPUT = 1 << 14   # elements: inputs up to this size share one multi-tensor copy per dtype


class CUDAGraphStep:
    """Replays `fn` from one CUDA graph per batch size (the engine pads batches to buckets 1, 2, 4, …, max).

    The first call of a batch size copies its arguments into static input buffers, runs `fn` twice on a side
    stream (warm-up: allocator, cuBLAS workspaces) and captures it; every call copies the arguments into those
    buffers (the small ones with one multi-tensor copy per dtype: the draft's three int64 inputs in one launch; a
    large one, such as the draft's features, with its own memcpy) and replays. The returned tensors are the
    graph's static outputs: the next call with the same batch size overwrites them. A DFLASH step may run more
    than once on the same inputs: it rewrites the same KV slots with the same values and reads only slots it or
    earlier steps wrote.
    """

    def __init__(self, fn, pool):
        self.fn, self.pool, self.graphs = fn, pool, {}

    def __call__(self, *args):
        entry = self.graphs.get(args[0].shape[0])
        if entry is None:
            entry = self.graphs[args[0].shape[0]] = self._capture(args)
        inputs, graph, outputs = entry
        small = {}  # dtype -> (buffers, args) of the small inputs: one multi-tensor copy per dtype
        for buffer, arg in zip(inputs, args):
            if arg.numel() > SMALL_INPUT:
                buffer.copy_(arg)   # a memcpy: multi_tensor_apply took 14.7 µs for the draft's 655 KB features
                continue
            buffers, values = small.setdefault(buffer.dtype, ([], []))
            buffers.append(buffer)
            values.append(arg)
        for buffers, values in small.values():
            torch._foreach_copy_(buffers, values)
        graph.replay()
        return outputs

    def _capture(self, args):
        inputs = [arg.clone() for arg in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(*inputs)
        return inputs, graph, outputs


def graph_pool():
    """One memory pool shared by all of an engine's graphs (they replay one after another on one stream)."""
    return torch.cuda.graph_pool_handle()
