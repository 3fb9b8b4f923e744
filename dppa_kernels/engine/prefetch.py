"""A reader thread that loads the next tensor group while the current one is computed.

At most ``depth`` groups are read ahead of the consumer, so memory stays bounded by
(depth + 1) groups of (models + 1) tensors. On CUDA the reads land in pinned buffers and are
copied to the device with ``non_blocking=True`` on a side stream; the consumer waits on an event.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

import torch

_DONE = object()


class Prefetcher:
    """Iterate ``(key, tensors)`` for ``keys``, where ``load(key) -> list[Tensor]`` runs on a thread."""

    def __init__(self, keys: Iterable, load: Callable, device: torch.device, depth: int = 1):
        self.keys = list(keys)
        self.load = load
        self.device = device
        self.cuda = device.type == "cuda"
        self.slots = threading.Semaphore(depth)
        self.q: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._run, name="dppa-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for key in self.keys:
                self.slots.acquire()
                if self.stop.is_set():
                    return
                tensors = self.load(key)
                event = None
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
                        event = torch.cuda.Event()
                        event.record(self.stream)
                self.q.put((key, tensors, event))
            self.q.put(_DONE)
        except BaseException as exc:  # re-raised in the consumer thread
            self.q.put(exc)

    def __iter__(self) -> Iterator:
        while True:
            item = self.q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            key, tensors, event = item
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                for t in tensors:  # the side stream's buffers are now used on the current stream
                    t.record_stream(torch.cuda.current_stream(self.device))
            yield key, tensors

    def done_one(self) -> None:
        """The consumer finished a group: let the reader load one more."""
        self.slots.release()

    def close(self) -> None:
        self.stop.set()
        self.slots.release()
        self.thread.join(timeout=30)


def prefetch(keys: Iterable, load: Callable, device: torch.device, depth: int = 1,
             progress: Optional[object] = None) -> Iterator:
    """Generator form: yields (key, tensors) and frees the slot when the consumer comes back."""
    pf = Prefetcher(keys, load, device, depth)
    try:
        for key, tensors in pf:
            yield key, tensors
            del tensors
            pf.done_one()
            if progress is not None:
                progress.update(1)
    finally:
        pf.close()
