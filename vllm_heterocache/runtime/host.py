"""The host tier: full prompt K/V of satellite heads, the source of refills (algorithm.md 4).

Only satellites are ever refilled, so only they are mirrored here. Storage, in blocks of its
own (block manager below, not vLLM's)::

    storage  [num_blocks, rows, block_size, 2, D]      (KV cache dtype)

``rows`` is every (layer, satellite) of this rank (``HeteroCacheRuntime.host_rows``); token ``p``
of a request lives in block ``blocks[p // block_size]`` at offset ``p % block_size``. A request
gets all the blocks its prompt needs when its prefill starts (all or nothing), and gives them
back when it finishes, is aborted or preempted. On a CPU machine host and device are both DRAM;
``path`` backs the storage with a memory-mapped file instead, so the full copies can leave RAM.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

import torch

from vllm_heterocache.errors import ConfigError
from vllm_heterocache.ops import kernels
from vllm_heterocache.ops.paged import BlockLayout

GIB = 1 << 30


@dataclass
class HostTierStats:
    bytes_in: int = 0  # written into the tier (prefill mirroring)
    bytes_out: int = 0  # read out of it (refills)
    rejected: int = 0  # requests that did not fit (served without refills)


class HostTier:
    def __init__(
        self,
        *,
        rows: int,
        head_size: int,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int,
        path: str | None = None,
    ):
        if rows < 1 or num_blocks < 1 or block_size < 1:
            raise ValueError(f"host tier needs rows, blocks and block size >= 1, got {rows}, {num_blocks}, {block_size}")
        self.block_size = block_size
        shape = (num_blocks, rows, block_size, 2, head_size)
        if path is None:
            self.storage = torch.empty(shape, dtype=dtype)
        else:
            self.storage = _file_backed(path, shape, dtype)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # refills read block lists from a worker thread
        self.stats = HostTierStats()

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[0]

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def holds(self, key: str) -> bool:
        return key in self._blocks

    def allocate(self, key: str, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` tokens of request ``key``; False (nothing taken) if full."""
        need = -(-num_tokens // self.block_size)
        with self._lock:
            if key in self._blocks:
                raise RuntimeError(f"host tier: request {key!r} already holds blocks")
            if need > len(self._free):
                self.stats.rejected += 1
                return False
            taken = [self._free.pop() for _ in range(need)]
            self._blocks[key] = torch.tensor(taken, dtype=torch.int64)
        return True

    def free(self, key: str) -> None:
        with self._lock:
            blocks = self._blocks.pop(key, None)
            if blocks is not None:
                self._free.extend(reversed(blocks.tolist()))

    def write(self, key: str, first_row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[T, R, D]`` into rows ``first_row .. first_row + R - 1`` at positions
        ``start .. start + T - 1`` (one strided copy per block touched)."""
        t, r = k.shape[0], k.shape[1]
        if t == 0:
            return
        table = self._table(key, start + t - 1)
        bs = self.block_size
        pos = start
        while pos < start + t:
            off, n = pos % bs, min(bs - pos % bs, start + t - pos)
            dst = self.storage[int(table[pos // bs]), first_row : first_row + r, off : off + n]  # [R, n, 2, D]
            dst[:, :, 0] = k[pos - start : pos - start + n].transpose(0, 1)
            dst[:, :, 1] = v[pos - start : pos - start + n].transpose(0, 1)
            pos += n
        self.stats.bytes_in += 2 * k.numel() * self.storage.element_size()

    def read(self, key: str, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[n, D]`` of one row at ``positions`` (int64, each below the allocated length)."""
        blocks, offsets = self._locate(key, positions)
        kv = self.storage[blocks, row, offsets]  # [n, 2, D]
        self.stats.bytes_out += kv.numel() * kv.element_size()
        return kv[:, 0], kv[:, 1]

    def copy_out(self, key: str, rows: list[int], positions: torch.Tensor, caches: list[torch.Tensor],
                 tables: list[torch.Tensor], layout: BlockLayout) -> None:
        """Refill copies straight into paged single-head caches (``kernels.refill_copy``): slot
        ``i`` of ``caches[s]`` (int32 block-table row ``tables[s]``) gets position
        ``positions[s, i]`` of row ``rows[s]`` (int64 ``[S, width]``; -1 leaves the slot)."""
        blocks = self._table(key, int(positions.max()) if positions.numel() else -1)
        kernels.refill_copy(self.storage, blocks, torch.tensor(rows, dtype=torch.int64), positions.contiguous(),
                            caches, tables, layout)
        self.stats.bytes_out += 2 * int((positions >= 0).sum()) * self.storage.shape[-1] * self.storage.element_size()

    def _locate(self, key: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self._table(key, int(positions.max()) if positions.numel() else -1)
        return blocks[positions // self.block_size], positions % self.block_size

    def _table(self, key: str, last: int) -> torch.Tensor:
        """Request ``key``'s blocks, checked to cover position ``last``."""
        with self._lock:
            blocks = self._blocks.get(key)
        if blocks is None:
            raise KeyError(f"host tier: request {key!r} holds no blocks")
        if last >= blocks.numel() * self.block_size:
            raise IndexError(f"host tier: position {last} beyond request {key!r}'s blocks")
        return blocks


def _file_backed(directory: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor on a memory-mapped file in ``directory`` (unlinked at once: it goes with the
    process). Its blocks are reserved on the disk up front, so a disk that fills later cannot
    fault the mapping (SIGBUS) in the middle of serving; a disk without room is a clear error now."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"heterocache.host_tier_path {directory!r} is not a directory")
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    disk = os.statvfs(directory)
    free = disk.f_bavail * disk.f_frsize
    if nbytes > free:  # checked first: where the filesystem cannot reserve, posix_fallocate writes zeros
        raise ConfigError(_no_room(directory, nbytes, free))
    fd, name = tempfile.mkstemp(prefix="heterocache-host-", dir=directory)
    try:
        os.unlink(name)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            raise ConfigError(_no_room(directory, nbytes, free) + f" ({e.strerror})") from e
        storage = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
    return storage.view(shape)


def _no_room(directory: str, nbytes: int, free: int) -> str:
    return (f"heterocache.host_tier_path {directory!r} has {free / GIB:.2f} GiB free, and the host tier needs "
            f"{nbytes / GIB:.2f} GiB: free space there, choose another directory, or lower heterocache.host_tier_gib")
