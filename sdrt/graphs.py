"""CUDA graphs for the torch backend: how a call is recorded, and which recorded calls are kept.

    capture(run)    warm run on a side stream (Triton autotuning and compilation, cuBLAS/cuDNN handles, lazy module
                    state: none of it may happen while recording), then run() recorded into a torch.cuda.CUDAGraph.
    CapturedCall    fn(*tensors) -> a tensor or a dict of tensors, recorded once for its inputs' shapes and dtypes:
                    each call copies its inputs into the graph's static buffers and replays. The torch backend
                    records its once-per-image verbs this way (text encoders, VAE decoder and encoder), and its unet
                    verb for callers with a loop of their own; the whole denoising loop is recorded by
                    sdrt.loop.CapturedLoop.
    GraphCache      key -> recorded call, least recently used dropped first (each one holds a private memory pool).

Why the one-shot verbs too: uncaptured, their time is the host's. CLIP-L launches ~200 kernels and the VAE decoder
~130, of which ~60 are Triton launches at ~100 us of Python each; on an H100 (gpu_h100_sd15_512.md) the text encoder
took 5.8 ms and the VAE decode 18.7 ms of a 458 ms image, beside 8.4 ms per UNet step inside the captured loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

from sdrt.blocks import no_text_kv


def capture(run: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output of the recorded run). The output lives in the graph's pool: each replay overwrites it.

    Both runs are outside any text K/V cache of the caller's (sdrt.blocks.no_text_kv): the graph records its own
    projections. A recording that fails (a host sync inside run) raises, with the caller's stream current again:
    torch.cuda.graph's exit raises from capture_end before it restores the stream, and the caller's uncaptured
    fallback would otherwise run on the dead capture's stream, unordered with the rest of its work."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs advises
    side.wait_stream(stream)
    with no_text_kv():
        with torch.cuda.stream(side):
            run()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = run()
        finally:
            torch.cuda.set_stream(stream)
    return graph, out


class CapturedCall:
    """fn over static copies of `inputs`, recorded once; calling it with same-shaped tensors replays it."""

    def __init__(self, fn: Callable, *inputs: torch.Tensor):
        self.inputs = [t.clone() for t in inputs]
        self.graph, self.out = capture(lambda: fn(*self.inputs))

    def __call__(self, *inputs: torch.Tensor):
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return tree_map(lambda t: t.clone(), self.out)  # the next replay overwrites self.out


def signature(*tensors: torch.Tensor | None) -> tuple:
    """What a recorded call is specialised on: each input's shape and dtype (None for an absent one)."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)


class GraphCache:
    """At most `capacity` recorded calls by key, least recently used dropped first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):  # keys, least recently used first
        return iter(self.entries)

    def get(self, key, make: Callable[[], object]):
        """The entry for key, made (and older ones dropped) when missing."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        if self.entries and len(self.entries) >= self.capacity and torch.cuda.is_available():
            torch.cuda.synchronize()  # a replay may still read a pool about to go back to the allocator
        while len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[key] = entry = make()
        return entry
