"""Writes merged tensors on a background thread, so disk writes overlap the next tensor's merge."""

from __future__ import annotations

import queue
import threading


class BackgroundWriter:
    """Feeds a ShardWriter from one thread, in plan order.

    At most ``depth`` merged tensors wait in the queue, so memory stays bounded (depth × the
    largest output tensor). A write error is raised by the next ``add`` or by ``join``.
    Everything else (``bytes_written``) is the ShardWriter's.
    """

    def __init__(self, writer, depth: int = 1):
        self._writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dppa-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None and not self._stop:
                try:
                    self._writer.add(*item)
                except BaseException as exc:  # re-raised on the merging thread
                    self._error = exc

    def add(self, task, tensor, row=None) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((task, tensor, row))

    def join(self) -> None:
        """Wait until every queued tensor is written; raise the first write error."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop writing (queued tensors are dropped) and close the partial shard."""
        self._stop = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._writer.abort()

    def __getattr__(self, name):
        return getattr(self._writer, name)
