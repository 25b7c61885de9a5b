"""One worker thread that runs queued work in batches: the replica's preparation and VQ decode.

Requests reach a replica one by one, but their preparation (CLIP and the resampler over the style
reference) and their VQ decode are batched models: several references or token grids cost little more
than one. :class:`BatchingWorker` queues each piece of work under a *kind* and, whenever its thread is
free, takes the oldest queued item's kind and hands that kind's handler every queued item of the kind
(up to ``max_batch``, in arrival order). Work that arrives while a batch runs joins the next one, so
batches form exactly when there is a queue and a lone request never waits for company.

Each handler takes a list of items and returns one result per item (a per-item failure is a result, e.g.
an error response; an exception fails the whole batch). :meth:`submit` returns a
:class:`concurrent.futures.Future`; ``asyncio.wrap_future`` awaits it on an event loop.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

Handler = Callable[[list[Any]], Sequence[Any]]


class BatchingWorker:
    """Runs ``handlers[kind](items)`` on one thread for batches of queued items of one kind.

    ``batch_sizes`` counts the batches run per kind and size (``{(kind, size): count}``).
    """

    def __init__(self, handlers: dict[str, Handler], max_batch: int = 8, name: str = "batching") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.handlers = dict(handlers)
        self.max_batch = max_batch
        self.batch_sizes: Counter[tuple[str, int]] = Counter()
        self._queue: deque[tuple[str, Any, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, item: Any) -> Future:
        """Queue ``item`` for ``kind``'s handler; the future holds its result."""
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r} (known: {sorted(self.handlers)})")
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            self._queue.append((kind, item, future))
            self._cond.notify()
        return future

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop after the work already queued; later :meth:`submit` calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take(self) -> tuple[str, list[tuple[Any, Future]]] | None:
        """The oldest item's kind and every queued item of that kind (up to ``max_batch``), or None to stop."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            kind = self._queue[0][0]
            batch, rest = [], deque()
            while self._queue:
                entry = self._queue.popleft()
                if entry[0] == kind and len(batch) < self.max_batch:
                    batch.append((entry[1], entry[2]))
                else:
                    rest.append(entry)
            self._queue = rest
            return kind, batch

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            kind, batch = taken
            # A future its caller cancelled while queued is dropped here: its work is not done.
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes[(kind, len(batch))] += 1
            try:
                results = list(self.handlers[kind]([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{kind} handler returned {len(results)} results for {len(batch)} items"
                    )
            except BaseException as exc:  # noqa: BLE001 -- delivered to every caller of the batch
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results):
                fut.set_result(result)


__all__ = ["BatchingWorker"]
