"""A micro-batcher: images from concurrent requests run through the model as one batch.

KServe's own batcher is a sidecar for the v1 protocol only; this one sits inside the model
server, works for every protocol and keeps one forward pass running at a time (torch already
uses every core for one batch, so two concurrent passes only contend). A batch closes when it
holds `max_batch_size` images or `max_latency_s` after its first request arrived.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram

BATCH_SIZE = Histogram(
    "xrayops_batch_images", "Images per model forward pass (micro-batches across requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass
class _Job:
    items: list
    future: asyncio.Future


class MicroBatcher:
    """`await submit(items)` returns `run(items)`'s results for those items, in order.

    `run` takes a list of items and returns one result per item; it runs on one worker thread.
    """

    def __init__(self, run: Callable[[list], Sequence[Any]], max_batch_size: int = 32, max_latency_s: float = 0.005):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrayops-batch")

    async def submit(self, items: Sequence) -> list:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work())
        job = _Job(list(items), loop.create_future())
        await self._queue.put(job)
        return await job.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            n = len(jobs[0].items)
            deadline = loop.time() + self.max_latency_s
            # A request larger than a batch runs alone; otherwise top up until full or late.
            while n < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                n += len(job.items)
            await self._run(loop, jobs)

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        BATCH_SIZE.observe(len(items))
        try:
            results = await loop.run_in_executor(self._executor, self.run, items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # every waiting request gets the error, the worker lives on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            if not job.future.done():  # a cancelled request (client gone) is skipped
                job.future.set_result(list(results[start : start + len(job.items)]))
            start += len(job.items)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
