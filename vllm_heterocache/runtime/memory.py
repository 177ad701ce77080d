"""How much memory this process may still take: the machine's available memory, or less where
a memory cgroup limits it (a container's or a pod's memory limit, where the kernel's OOM killer
acts long before the node runs out).

Reads cgroup v2 (``memory.max`` / ``memory.current``) and v1 (``memory.limit_in_bytes`` /
``memory.usage_in_bytes``), for the process's own cgroup and every cgroup above it (a limit on
any ancestor applies), under ``/sys/fs/cgroup``; in a container whose cgroup namespace makes its
own cgroup the mount's root, the root's files are its limit. Usage counts the page cache, e.g. a
checkpoint just read; its inactive part (``inactive_file`` in ``memory.stat``) is reclaimed
before the limit bites, so it counts as room, as the kubelet's working set counts it.
"""

from __future__ import annotations

from pathlib import Path

import psutil

UNLIMITED = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63 - 1


def available_memory(cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """Bytes: ``min(machine available, limit - usage of every cgroup limiting this process)``."""
    available = psutil.virtual_memory().available
    room = cgroup_room(Path(cgroup_root), Path(proc_cgroup))
    return available if room is None else max(0, min(available, room))


def cgroup_room(root: Path, proc_cgroup: Path) -> int | None:
    """The least ``limit - usage`` of the memory cgroups that limit this process; None if none does."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            mount = root / "unified" if (root / "unified").is_dir() else root
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            mount, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        rooms += [r for d in _cgroup_and_ancestors(mount, path) if (r := _room(d, *files)) is not None]
    return min(rooms, default=None)


def _cgroup_and_ancestors(mount: Path, path: str) -> list[Path]:
    here = mount / path.strip("/")
    dirs = [here, *(p for p in here.parents if p.is_relative_to(mount))]
    return [d for d in dirs if d.is_dir()]


def _room(directory: Path, limit_file: str, usage_file: str, inactive_file_key: str) -> int | None:
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= UNLIMITED:
        return None
    return int(limit) - usage + _stat(directory, inactive_file_key)


def _stat(directory: Path, key: str) -> int:
    """A ``memory.stat`` entry (0 if absent)."""
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
