"""Asynchronous refills: copies from the host tier into the compressed pool, off the decode path.

A drift found in layer ``l`` at decode step ``s`` submits the copies of that layer's satellites
and the step goes on; the next step that reads those satellites' slots (layer ``l`` at step
``s + 1``) waits for exactly that request's and layer's copies, nothing else. On a CPU machine
the copies run on one worker thread (torch's copy kernels drop the GIL). A copy that fails is
never silent: :meth:`RefillQueue.wait` returns its exception to the runtime, which logs and
counts it and serves that request on without refills (``HeteroCacheRuntime.refill_failed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from vllm_heterocache.runtime.stats import REFILL_WAIT_BUCKETS, Histogram


class RefillQueue:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heterocache-refill")
        self._pending: dict[tuple[str, int], list[Future]] = {}
        self.waits = Histogram(REFILL_WAIT_BUCKETS)  # seconds a step waited for its copies

    def submit(self, key: str, layer: int, copy: Callable[[], None]) -> None:
        self._pending.setdefault((key, layer), []).append(self._pool.submit(copy))

    def wait(self, key: str, layer: int) -> Exception | None:
        """Block until the pending copies of request ``key`` in ``layer`` are done; the first
        exception one of them raised, or None."""
        pending = self._pending.pop((key, layer), None)
        if not pending:
            return None
        start = time.perf_counter()
        failure = None
        for future in pending:
            error = future.exception()
            failure = failure or error
        self.waits.observe(time.perf_counter() - start)
        return failure

    def wait_request(self, key: str) -> Exception | None:
        """Block until every pending copy of request ``key`` is done (before its blocks go back)."""
        failures = [self.wait(*pending) for pending in [p for p in self._pending if p[0] == key]]
        return next((f for f in failures if f is not None), None)

    def __len__(self) -> int:
        return sum(len(f) for f in self._pending.values())
