"""What /proc and the mount table say about processes and namespaces; killing by pid.

Used by the launcher to find and stop exactly the processes of one cluster: by pid and
start time (a pid the kernel gave to another program since is never signalled), or by
the network namespace a process is in.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks; None if there is no such live process (zombies count as gone)."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def descendants(roots: list[int]) -> list[int]:
    """Every live descendant of the root pids (children, their children, ...), parents first."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(pid)
    found: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(0), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def processes_in_netns(inodes: set[int]) -> list[int]:
    """Every process (but this one) whose network namespace is one of `inodes`."""
    me = os.getpid()
    found = []
    for pid in pids():
        if pid == me:
            continue
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        m = re.match(r"net:\[(\d+)\]", link)
        if m and int(m.group(1)) in inodes:
            found.append(pid)
    return found


def kill(pid: int, group: bool = False) -> bool:
    """SIGKILL pid (its whole process group if it leads one); True if it was there."""
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("cannot kill %d: %s", pid, exc)
        return False


def wait_gone(pids_: list[int], timeout: float = 2.0) -> None:
    """Wait until the pids are gone or zombies (orphans are reaped by init, not by us)."""
    deadline = time.monotonic() + timeout
    pending = list(pids_)
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if (_stat_fields(pid) or ["X"])[0] not in ("Z", "X")]
        if pending:
            time.sleep(0.01)


def umount_and_remove(path: Path) -> bool:
    """Lazily unmount a netns bind mount and remove the file; True if anything was there."""
    found = False
    # A netns file may carry more than one mount (stacked); unmount until EINVAL.
    for _ in range(8):
        if _libc.umount2(os.fsencode(str(path)), _MNT_DETACH) == 0:
            found = True
            continue
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("umount %s: %s", path, os.strerror(err))
        break
    try:
        path.unlink()
        found = True
    except FileNotFoundError:
        pass
    return found
