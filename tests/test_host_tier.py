"""The host tier's block manager and storage (no vLLM)."""

import os
from pathlib import Path

import psutil
import pytest
import torch

from vllm_heterocache.errors import ConfigError

from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.memory import available_memory, cgroup_room
from vllm_heterocache.runtime.refill import RefillQueue


def tier(**kw):
    args = dict(rows=3, head_size=8, dtype=torch.float32, block_size=4, num_blocks=5)
    return HostTier(**{**args, **kw})


def test_allocate_write_read_free():
    t = tier()
    assert t.allocate("a", 9)  # 3 blocks
    assert t.used_blocks == 3 and t.holds("a")
    k, v = torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    t.write("a", 1, 0, k, v)  # rows 1 and 2
    pos = torch.tensor([0, 4, 8, 5])
    rk, rv = t.read("a", 1, pos)
    assert torch.equal(rk, k[pos, 0]) and torch.equal(rv, v[pos, 0])
    rk, _ = t.read("a", 2, pos)
    assert torch.equal(rk, k[pos, 1])
    assert t.stats.bytes_in == 2 * k.numel() * 4 and t.stats.bytes_out == 2 * 2 * 4 * 8 * 4
    t.free("a")
    assert t.used_blocks == 0 and not t.holds("a")
    t.free("a")  # idempotent


def test_chunked_writes_land_at_their_positions():
    t = tier()
    assert t.allocate("a", 10)
    k = torch.arange(10 * 3 * 8, dtype=torch.float32).view(10, 3, 8)
    for start, end in ((0, 3), (3, 7), (7, 10)):  # prefill chunks, across block boundaries
        t.write("a", 0, start, k[start:end], -k[start:end])
    got, neg = t.read("a", 1, torch.arange(10))
    assert torch.equal(got, k[:, 1]) and torch.equal(neg, -k[:, 1])


def test_exhaustion_takes_nothing_and_is_counted():
    t = tier()
    assert t.allocate("a", 12)  # 3 of 5 blocks
    assert not t.allocate("b", 9)  # needs 3, 2 left: refused whole
    assert t.used_blocks == 3 and not t.holds("b") and t.stats.rejected == 1
    with pytest.raises(KeyError, match="holds no blocks"):
        t.read("b", 0, torch.tensor([0]))
    assert t.allocate("c", 8)  # 2 blocks still fit
    t.free("a")
    t.free("c")
    assert t.used_blocks == 0


def test_reads_beyond_the_allocation_fail_loudly():
    t = tier()
    t.allocate("a", 4)
    with pytest.raises(IndexError):
        t.read("a", 0, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="already holds"):
        t.allocate("a", 4)


def test_blocks_are_reused_without_growth():
    t = tier()
    for i in range(100):
        assert t.allocate(str(i), 1 + i % 20)
        t.free(str(i))
    assert t.used_blocks == 0 and len(t._free) == 5


def test_file_backed_storage(tmp_path):
    t = tier(path=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the file is unlinked at once; the mapping keeps it
    t.allocate("a", 4)
    k = torch.randn(4, 1, 8)
    t.write("a", 1, 0, k, k)
    assert torch.equal(t.read("a", 1, torch.arange(4))[0], k[:, 0])
    with pytest.raises(FileNotFoundError, match="host_tier_path"):
        tier(path=str(tmp_path / "missing"))


def test_file_backed_storage_is_reserved_up_front_or_a_clear_error(tmp_path):
    disk = os.statvfs(tmp_path)
    free = disk.f_bavail * disk.f_frsize
    rows, d, bs = 4, 1024, 256  # 8 MiB a block in float32
    with pytest.raises(ConfigError, match=r"heterocache.host_tier_path .* GiB free, and the host tier needs"):
        tier(rows=rows, head_size=d, block_size=bs, num_blocks=free // (rows * bs * 2 * d * 4) + 16, path=str(tmp_path))
    t = tier(rows=rows, head_size=d, block_size=bs, num_blocks=8, path=str(tmp_path))
    used = free - (lambda s: s.f_bavail * s.f_frsize)(os.statvfs(tmp_path))
    assert used >= 0.9 * t.nbytes  # reserved on disk now, not when the pages are first written (sparse file)


def cgroup_tree(root: Path, version: int, limit: str, usage: int, path: str = "pod/ctr") -> Path:
    """A cgroup filesystem as the kernel shows it, limiting ``path`` (v1: the memory hierarchy)."""
    base = root / ("memory" if version == 1 else "")
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == 1 else ("memory.max", "memory.current")
    for d, lim in ((base, "max" if version == 2 else str((1 << 63) - 4096)), (base / path, limit)):
        d.mkdir(parents=True, exist_ok=True)
        (d / names[0]).write_text(lim + "\n")
        (d / names[1]).write_text(f"{usage}\n")
    proc = root / "proc-self-cgroup"
    proc.write_text(f"4:memory:/{path}\n1:cpu:/\n" if version == 1 else f"0::/{path}\n")
    return proc


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_honours_the_containers_memory_limit(tmp_path, version):
    gib = 1 << 30
    proc = cgroup_tree(tmp_path, version, limit=str(3 * gib), usage=gib)
    assert cgroup_room(tmp_path, proc) == 2 * gib
    assert available_memory(tmp_path, proc) == min(2 * gib, psutil.virtual_memory().available)


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_without_a_limit_is_the_machines(tmp_path, version):
    unlimited = "max" if version == 2 else str((1 << 63) - 4096)
    proc = cgroup_tree(tmp_path, version, limit=unlimited, usage=1 << 30)
    assert cgroup_room(tmp_path, proc) is None
    assert cgroup_room(tmp_path, tmp_path / "no-such-file") is None


@pytest.mark.parametrize("version", [1, 2])
def test_inactive_page_cache_counts_as_room(tmp_path, version):
    """A checkpoint just read sits in the page cache, counted in the cgroup's usage; its inactive
    part is reclaimed before the limit bites."""
    proc = cgroup_tree(tmp_path, version, limit="1000", usage=900)
    ctr = tmp_path / ("memory" if version == 1 else "") / "pod" / "ctr"
    key = "total_inactive_file" if version == 1 else "inactive_file"
    (ctr / "memory.stat").write_text(f"anon 100\nactive_file 50\n{key} 700\n")
    assert cgroup_room(tmp_path, proc) == 1000 - 900 + 700


def test_a_limit_on_a_parent_cgroup_applies(tmp_path):
    proc = cgroup_tree(tmp_path, 2, limit="max", usage=100)
    (tmp_path / "pod" / "memory.max").write_text("1000\n")
    (tmp_path / "pod" / "memory.current").write_text("400\n")
    assert cgroup_room(tmp_path, proc) == 600


def test_refill_queue_waits_per_request_and_layer_and_returns_failures():
    q = RefillQueue()
    done = []
    q.submit("a", 0, lambda: done.append("a0"))
    q.submit("a", 1, lambda: done.append("a1"))
    q.submit("b", 0, lambda: done.append("b0"))
    assert q.wait("a", 0) is None
    assert "a0" in done and len(q) == 2
    assert q.wait_request("a") is None
    assert "a1" in done and len(q) == 1
    q.submit("c", 0, lambda: 1 / 0)
    q.submit("c", 0, lambda: done.append("c0"))
    assert isinstance(q.wait("c", 0), ZeroDivisionError)
    assert "c0" in done  # the copies after a failed one still ran and were waited for
    assert q.wait("c", 0) is None  # nothing pending: no wait observed
    assert q.wait_request("b") is None and len(q) == 0
    waits = q.waits.cumulative()
    assert waits[-1] == q.waits.count == 4  # one observation per wait that had copies pending
