"""One thread that writes what callers queue, as many items per write as have queued up (group commit).

The audience sync records each batch's outcome with it while the next batches are read and sent;
ingestion commits the messages of every request waiting at that moment in one transaction, which keeps
SQLite's single writer busy with few large commits instead of many requests contending for its lock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["GroupWriter", "WriterClosed"]

T = TypeVar("T")


class WriterClosed(RuntimeError):
    """The writer was closed: it takes nothing more."""


@dataclass
class _Job(Generic[T]):
    item: T
    future: Future[None] = field(default_factory=Future)


class GroupWriter(Generic[T]):
    """Writes queued items in order from one thread: ``write`` gets every item waiting when the thread
    comes to them (at most ``max_group`` of ``weight``), in one call.

    ``submit`` returns a future that completes once its item is written, or fails with the error. When a
    write fails, ``isolate=True`` writes that group's items one by one, so that only the item the
    database refuses fails; ``isolate=False`` makes the writer fail as a whole: that group and every
    later item get the error, without being written, and ``submit`` and ``close`` raise it.

    ``depth`` bounds the queue (``submit`` waits while it is full; 0: unbounded). The thread starts with
    the first submit and ends with :meth:`close`, which writes what is queued first.
    """

    def __init__(
        self,
        write: Callable[[list[T]], None],
        *,
        name: str,
        depth: int = 0,
        max_group: int | None = None,
        weight: Callable[[T], int] = lambda _item: 1,
        isolate: bool = False,
    ) -> None:
        self._write = write
        self._name = name
        self._max_group = max_group
        self._weight = weight
        self._isolate = isolate
        self._queue: queue.Queue[_Job[T] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.error: BaseException | None = None
        """What made a writer with ``isolate=False`` fail (None: it has not failed)."""

    def submit(self, item: T) -> Future[None]:
        """Queue ``item`` for the next write. Raises :class:`WriterClosed` after :meth:`close`, and the
        writer's error once it failed (``isolate=False``)."""
        if self.error is not None:
            raise self.error
        with self._lock:
            if self._closed:
                raise WriterClosed(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        job: _Job[T] = _Job(item)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the thread (waiting at most ``timeout`` seconds for it).
        Raises the writer's error if it failed."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            weight = self._weight(first.item)
            while self._max_group is None or weight < self._max_group:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                group.append(job)
                weight += self._weight(job.item)
            self._commit(group)

    def _commit(self, group: list[_Job[T]]) -> None:
        if self.error is not None:
            for job in group:
                job.future.set_exception(self.error)
            return
        try:
            self._write([job.item for job in group])
        except BaseException as exc:
            if self._isolate and len(group) > 1:
                for job in group:  # find the item the database refuses
                    self._commit([job])
                return
            if not self._isolate:
                self.error = exc
            for job in group:
                job.future.set_exception(exc)
            return
        for job in group:
            job.future.set_result(None)
