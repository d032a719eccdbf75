"""Micro-batching: requests that arrive together run as one batch, off the event loop.

One background task collects queued items: when the first one arrives it waits up to
``max_wait_s`` for more (or until ``max_batch_size``), then runs the batch on the one
inference thread (one lane: the model never runs twice at once, and always from the same
thread, so the runtime's intra-op thread pool is created once). Items that queue while a batch runs form the next batch at once. A full queue
refuses new items (:class:`QueueFull`, the server's 503).

With ``incoming`` (the number of requests received but not queued yet, e.g. still
being decoded) the wait only lasts while such requests exist: a lone request does not
pay ``max_wait_s``, requests that arrive together still share a batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The batch queue holds ``max_queue`` items already."""


class MicroBatcher(Generic[T, R]):
    """Batch ``submit`` calls into calls of ``run_batch(list[T]) -> list[R]``.

    ``on_batch(size, seconds)`` and ``on_queue(depth)`` report to metrics; when a batch
    raises, its items are retried one by one so that one bad item fails alone.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        incoming: Callable[[], int] | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_queue = on_queue or (lambda depth: None)
        self.incoming = incoming
        self._executor: ThreadPoolExecutor | None = None
        self._queue: collections.deque[tuple[T, asyncio.Future]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch that runs)."""
        return len(self._queue)

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(RuntimeError("the server is shutting down"))
        self.on_queue(0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result (raises QueueFull when full)."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("the batcher is not running")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting already (max_queue={self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self.on_queue(len(self._queue))
        self._wakeup.set()
        return await fut

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the inference thread (e.g. the warm-up)."""
        if self._executor is None:
            raise RuntimeError("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = loop.time() + self.max_wait_s
            while len(self._queue) < self.max_batch_size:
                if self.incoming is not None and self.incoming() <= 0:
                    break  # nobody else is on the way
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item, fut = self._queue.popleft()
                if not fut.done():  # done = the client went away
                    batch.append((item, fut))
            self.on_queue(len(self._queue))
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        items = [item for item, _ in batch]
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, items)
        except Exception as err:  # noqa: BLE001 - reported to the waiting requests
            if len(batch) == 1:
                _settle(batch[0][1], error=err)
                return
            log.warning("a batch of %d failed (%s); running its items one by one", len(batch), err)
            for pair in batch:
                await self._run([pair])
            return
        self.on_batch(len(items), time.perf_counter() - start)
        for (_, fut), result in zip(batch, results):
            _settle(fut, result=result)


def _settle(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
