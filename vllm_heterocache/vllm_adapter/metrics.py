"""HeteroCache's metrics on the server's own ``/metrics``, next to vLLM's (README, "Metrics").

vLLM serves ``/metrics`` from its API-server process, while HeteroCache counts in the engine's
worker processes (one runtime per tensor-parallel rank). So each worker publishes a snapshot
(``runtime.stats.snapshot`` plus its device pools) as a small JSON file, one per process,
replaced atomically, into a directory that the first process to load the plugin creates and
every process it starts inherits (``$HETEROCACHE_METRICS_DIR``); a collector in that process's
default Prometheus registry, the one vLLM's ``/metrics`` serves, reads the files at each scrape.
A worker publishes at most once a second while it steps, and at once when its last request
has left, so an idle server shows its settled state; the files of dead processes are dropped.

Labels: ``model_name`` and ``engine`` as vLLM's own metrics, plus ``tp_rank`` (sum over it for
the engine's totals; the device pool gauges are the same on every rank).

Not covered: workers that do not inherit the API server's environment (Ray workers on other
nodes) publish into a directory of their own, which no ``/metrics`` serves; with
``--api-server-count`` above 1, vLLM serves a multiprocess registry without this collector.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vllm.heterocache")

ENV_DIR = "HETEROCACHE_METRICS_DIR"
PREFIX = "heterocache_"
PUBLISH_INTERVAL_S = 1.0

# name (without the prefix, counters without _total) -> (type, help). Every snapshot key is here.
METRICS: dict[str, tuple[str, str]] = {
    "requests": ("gauge", "Requests whose HeteroCache state this rank holds."),
    "prefill_selections": ("counter", "Prompts whose compressed heads kept a token selection at prefill."),
    "prefix_cache_hit_tokens": ("counter", "Prompt tokens of requests whose compressed heads select that came "
                                "from vLLM's prefix cache (their selections are computed per request)."),
    "drift_checks": ("counter", "Drift checks: one per request, layer with pivots and drift interval."),
    "drifts": ("counter", "Pivots whose top-k set drifted (each refills its satellites)."),
    "refilled_heads": ("counter", "Satellite head refills queued from the host tier."),
    "refill_failures": ("counter", "Refill copies that failed; their request went on without refills."),
    "refills_pending": ("gauge", "Refill copies queued and not yet waited for."),
    "refill_wait_seconds": ("histogram", "Time a decode step waited for a request's refill copies of one layer."),
    "host_tier_blocks_used": ("gauge", "Host-tier blocks held by requests."),
    "host_tier_blocks_total": ("gauge", "Host-tier blocks in all."),
    "host_tier_bytes_in": ("counter", "Bytes written into the host tier (prompt K/V of satellite heads)."),
    "host_tier_bytes_out": ("counter", "Bytes copied out of the host tier by refills."),
    "host_tier_rejections": ("counter", "Requests the host tier had no room for (served without refills)."),
    "device_pool_blocks": ("gauge", "KV cache blocks held by running requests, per pool kind (full, compressed)."),
    "device_pool_bytes": ("gauge", "KV cache bytes held by running requests, per pool kind (full, compressed)."),
    "request_kept_fraction": ("histogram", "Fraction of its prompt KV cache each request kept, per policy (label "
                              "policy: the server's or the request's vllm_xargs heterocache_policy)."),
}

_owned_dir: str | None = None
_collector = None


def install() -> None:
    """In every process that loads the plugin (idempotent): make sure a metrics directory is
    named in the environment (the first process creates it, and removes it when it exits; the
    processes it starts inherit it) and the collector is in the default Prometheus registry."""
    global _owned_dir, _collector
    if not os.environ.get(ENV_DIR):
        _owned_dir = tempfile.mkdtemp(prefix="heterocache-metrics-")
        os.environ[ENV_DIR] = _owned_dir
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(_owned_dir, ignore_errors=True))
    if _collector is None:
        from prometheus_client import REGISTRY

        _collector = Collector()
        REGISTRY.register(_collector)


def metrics_dir() -> Path:
    value = os.environ.get(ENV_DIR)
    if not value:
        raise RuntimeError(f"heterocache: ${ENV_DIR} is not set (the plugin's registration sets it)")
    return Path(value)


class Publisher:
    """One worker's snapshots, written to ``<dir>/<pid>.json`` (atomically: a reader sees the
    last whole snapshot)."""

    def __init__(self, labels: dict[str, str]):
        self.labels = labels
        self.path = metrics_dir() / f"{os.getpid()}.json"
        self.published_at = float("-inf")
        self._failed = False

    def due(self, idle: bool) -> bool:
        return idle or time.monotonic() - self.published_at >= PUBLISH_INTERVAL_S

    def publish(self, snapshot: dict) -> None:
        self.published_at = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "labels": self.labels, **snapshot}))
            os.replace(tmp, self.path)
        except OSError as e:  # the metrics must never stop the engine; say so once
            if not self._failed:
                self._failed = True
                log.warning("heterocache: cannot publish metrics to %s (%s); /metrics will not show this "
                            "rank's heterocache_* metrics", self.path, e)


def read_snapshots(directory: Path) -> list[dict]:
    """The snapshots of live processes; the files of dead ones are removed."""
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced or removed while read: the next scrape has it
            continue
        if not _alive(snap.get("pid", -1)):
            path.unlink(missing_ok=True)
            continue
        out.append(snap)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def families(snapshots: list[dict]):
    """Prometheus metric families (``prometheus_client.core``) of the snapshots."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    classes = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
    made: dict[str, object] = {}

    def family(name: str, labels: list[str]):
        if name not in made:
            kind, text = METRICS[name]
            made[name] = classes[kind](PREFIX + name, text, labels=labels)
        return made[name]

    for snap in snapshots:
        names, values = list(snap["labels"]), list(snap["labels"].values())
        for section in ("counters", "gauges"):
            for name, value in snap.get(section, {}).items():
                if name not in METRICS:  # a newer worker's metric: shown once this process knows it
                    continue
                if isinstance(value, dict):  # per pool kind
                    for kind, v in value.items():
                        family(name, [*names, "kind"]).add_metric([*values, kind], v)
                else:
                    family(name, names).add_metric(values, value)
        for name, h in snap.get("histograms", {}).items():
            if name in METRICS:
                family(name, names).add_metric(values, *_buckets(h))
        for name, by_policy in snap.get("by_policy", {}).items():
            if name in METRICS:
                for policy, h in by_policy.items():
                    family(name, [*names, "policy"]).add_metric([*values, policy], *_buckets(h))
    return list(made.values())


def _buckets(h: dict) -> tuple[list[tuple[str, int]], float]:
    """A snapshot's histogram (``runtime.stats.Histogram.to_dict``) as prometheus_client takes it."""
    buckets = [(repr(float(b)), n) for b, n in zip(h["bounds"], h["cumulative"])]
    return [*buckets, ("+Inf", h["cumulative"][-1])], h["sum"]


class Collector:
    """Reads the workers' snapshots at each scrape (``prometheus_client`` custom collector)."""

    def collect(self):
        directory = os.environ.get(ENV_DIR)
        return families(read_snapshots(Path(directory))) if directory else []

    def describe(self):
        return []  # no fixed families: the registry must not call collect() at registration
