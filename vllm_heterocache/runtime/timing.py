"""Per-step time breakdown of decode steps, for benchmarks (off unless asked for).

``HETEROCACHE_STEP_TIMING=1`` in the engine's environment turns it on (a diagnostic: it is read
once, where the runtime is imported; the engine processes of one machine inherit it). Then every
engine step is timed, and the sections inside it::

    attention   each attention layer's cache write and forward (stock or HeteroCache)
    planning    HeteroCache's step hook and its metadata builders
    drift       HeteroCache's drift checks (inside attention)
    refill_wait waits for pending refill copies (inside attention)

Decode steps (every row one token) and all steps are accumulated apart; every ``REPORT_EVERY``
decode steps a line

    heterocache step timing: decode steps N; ms per step: total T, model M, attention A,
    planning P, drift D, refill_wait W

is logged, and the same for ``all steps`` every ``REPORT_EVERY`` steps (cumulative means;
``model`` = total - attention - planning, i.e. everything else vLLM does in the step;
``attention`` excludes drift and refill waits).
"""

from __future__ import annotations

import contextlib
import logging
import time

from vllm_heterocache import env

log = logging.getLogger("vllm.heterocache")

ENABLED = env.flag("HETEROCACHE_STEP_TIMING")
REPORT_EVERY = 32
SECTIONS = ("attention", "planning", "drift", "refill_wait")


class StepTimer:
    def __init__(self) -> None:
        self.totals = {kind: dict.fromkeys(("total", *SECTIONS), 0.0) for kind in ("decode", "all")}
        self.steps = {"decode": 0, "all": 0}
        self._current = dict.fromkeys(SECTIONS, 0.0)
        self._depth: dict[str, int] = dict.fromkeys(SECTIONS, 0)

    @contextlib.contextmanager
    def section(self, name: str):
        """Time a section of the current step (nested uses of one section count once)."""
        self._depth[name] += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth[name] -= 1
            if not self._depth[name]:
                self._current[name] += time.perf_counter() - start

    def end_step(self, seconds: float, decode: bool) -> None:
        """A step of ``seconds`` ended (``decode``: every row was decoding one token)."""
        current, self._current = self._current, dict.fromkeys(SECTIONS, 0.0)
        for kind in ("decode", "all") if decode else ("all",):
            self.steps[kind] += 1
            self.totals[kind]["total"] += seconds
            for name, value in current.items():
                self.totals[kind][name] += value
        if decode and self.steps["decode"] % REPORT_EVERY == 0:
            log.info("%s", self.line())
        if self.steps["all"] % REPORT_EVERY == 0:
            log.info("%s", self.line("all"))

    def line(self, kind: str = "decode") -> str:
        n = max(1, self.steps[kind])
        ms = {k: 1e3 * v / n for k, v in self.totals[kind].items()}
        model = ms["total"] - ms["attention"] - ms["planning"]
        own = ms["attention"] - ms["drift"] - ms["refill_wait"]
        name = "decode steps" if kind == "decode" else "all steps"
        return (
            f"heterocache step timing: {name} {self.steps[kind]}; ms per step: total {ms['total']:.3f}, "
            f"model {model:.3f}, attention {own:.3f}, planning {ms['planning']:.3f}, drift {ms['drift']:.3f}, "
            f"refill_wait {ms['refill_wait']:.3f}"
        )


TIMER = StepTimer()


def section(name: str):
    """``TIMER.section(name)`` when timing is on, else a no-op context."""
    return TIMER.section(name) if ENABLED else contextlib.nullcontext()
