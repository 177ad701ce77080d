"""Asynchronous refills: copies from the host tier into the compressed pool, off the decode path.

A drift found in layer ``l`` at decode step ``s`` submits the copies of that layer's satellites
and the step goes on; the next step that reads those satellites' slots (layer ``l`` at step
``s + 1``) waits for exactly that request's and layer's copies, nothing else. On a CPU machine
the copies run on one worker thread (torch's copy kernels drop the GIL). A copy that fails is
never silent: :meth:`RefillQueue.wait` returns its exception, and the caller logs and counts
it and serves that request on without refills (:func:`degrade`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from vllm_heterocache.runtime.stats import REFILL_WAIT_BUCKETS, Counters, Histogram

log = logging.getLogger("vllm.heterocache")


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


def degrade(state, failure: Exception, counters: Counters) -> None:
    """A refill copy of request ``state`` (``RequestState``) failed: log and count it; the request
    goes on without refills (its satellites keep the slots they hold; the engine keeps serving)."""
    counters.refill_failures += 1
    if state.host:
        state.host = False
        log.warning(
            "heterocache: a refill copy of request %s failed (%s: %s); the request goes on without "
            "refills (its satellites keep their current selection). Counted in "
            "heterocache_refill_failures_total.", state.key, type(failure).__name__, failure,
        )
