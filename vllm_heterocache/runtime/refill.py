"""Asynchronous refills: copies from the host tier into the compressed pool, off the decode path.

A drift found in layer ``l`` at decode step ``s`` submits the copies of that layer's satellites
and the step goes on; the next step that reads those satellites' slots (layer ``l`` at step
``s + 1``) waits for exactly that request's and layer's copies, nothing else. On a CPU machine
the copies run on one worker thread (torch's copy kernels drop the GIL); a failed copy raises in
the step that waits for it, never silently.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class RefillQueue:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heterocache-refill")
        self._pending: dict[tuple[str, int], list[Future]] = {}

    def submit(self, key: str, layer: int, copy: Callable[[], None]) -> None:
        self._pending.setdefault((key, layer), []).append(self._pool.submit(copy))

    def wait(self, key: str, layer: int) -> None:
        """Block until the pending copies of request ``key`` in ``layer`` are done."""
        for future in self._pending.pop((key, layer), ()):
            future.result()

    def wait_request(self, key: str) -> None:
        """Block until every pending copy of request ``key`` is done (before its blocks go back)."""
        for pending in [p for p in self._pending if p[0] == key]:
            self.wait(*pending)

    def wait_all(self) -> None:
        for pending in list(self._pending):
            self.wait(*pending)

    def __len__(self) -> int:
        return sum(len(f) for f in self._pending.values())
