"""Reusable output buffers for the per-tensor deltas.

Every tensor of a merge needs M delta buffers that die before the next tensor starts. Allocating
them fresh costs a page fault per 4 KiB page (large allocations come straight from the kernel,
zeroed, and go back on free) — as much time as computing the deltas. A workspace keeps one flat
buffer per slot, grown to the largest tensor seen, and hands out views of it: memory stays
bounded by M × the largest tensor, as before, and the pages stay mapped.
"""

from __future__ import annotations

import torch


class Workspace:
    """``view(slot, shape, dtype)``: a tensor over slot ``slot``'s buffer, valid until the next
    ``view`` of the same slot (callers must not keep it past the tensor being merged)."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self._bufs: dict = {}

    def view(self, slot, shape, dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(slot, None)  # free the old buffer before the larger one is allocated
            buf = self._bufs[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in one of the workspace's buffers."""
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self._bufs.values())
