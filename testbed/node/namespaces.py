"""Named network namespaces entered by the calling thread, without forks, and their sysctls.

A node or a pod is a named network namespace (/run/netns/<name>).

No forks. In pyroute2 0.9.7 `netns.create()` forks a child to make the namespace (~10 ms)
and `IPRoute(netns=...)` / `NetNS(...)` fork one to open the socket inside it (~12 ms).
Here the calling thread does it: unshare(CLONE_NEWNET) plus a bind mount of
/proc/thread-self/ns/net on /run/netns/<pod> (what `ip netns add` does) costs ~0.5 ms, and
a netlink socket opened while the thread is inside a namespace stays bound to it after the
thread leaves. Network namespaces belong to threads, not processes, so this is safe in a
threaded kubelet; every entry restores the thread's own namespace in a finally block.

Errors are PodNetworkError, naming the namespace and the step that failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
from typing import Iterator

from testbed import naming

NETNS_DIR = str(naming.NETNS_DIR)

_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_IFNAME_MAX = 15  # IFNAMSIZ - 1
_NETNS_NAME_MAX = 255  # a file name under /run/netns

_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

_netns_dir_ready = False
_netns_dir_lock = threading.Lock()


class PodNetworkError(OSError):
    """A netlink request, syscall or sysctl failed; the message names the pod/interface and step."""


def check_ifname(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid interface name {name!r}: must be a non-empty string")
    if len(name) > _IFNAME_MAX:
        raise ValueError(
            f"invalid interface name {name!r}: {len(name)} characters, Linux allows at most {_IFNAME_MAX}"
        )
    if not _IFNAME.match(name):
        raise ValueError(
            f"invalid interface name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def check_netns_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid netns name {name!r}: must be a non-empty string")
    if len(name) > _NETNS_NAME_MAX:
        raise ValueError(f"invalid netns name {name[:20]!r}...: {len(name)} characters, at most {_NETNS_NAME_MAX}")
    if not _NETNS_NAME.match(name):
        raise ValueError(
            f"invalid netns name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def netns_path(name: str) -> str:
    return naming.netns_path(check_netns_name(name))


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside the named namespace, e.g. to open sockets
    there (they stay in it). Never await inside the block: the whole event loop would move."""
    with _entered(netns_path(name), f"netns {name}"):
        yield


def remove_netns(name: str) -> None:
    """Unmount and delete a named namespace; nothing happens if it is gone."""
    _remove_netns(netns_path(name), f"netns {name}")


def _fail(err: int, what: str) -> PodNetworkError:
    return PodNetworkError(err, f"{what}: {os.strerror(err)}")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise _fail(ctypes.get_errno(), what)


def _setns_back(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise RuntimeError(f"cannot return thread to its network namespace: {os.strerror(err)}; the thread is unusable")


@contextlib.contextmanager
def _entered(path: str, what: str) -> Iterator[None]:
    """Run the block with the calling thread inside the namespace at path."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise _fail(e.errno, f"{what}: open {path}") from None
        try:
            _check(_libc.setns(target, _CLONE_NEWNET), f"{what}: setns({path})")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns_back(own)
    finally:
        os.close(own)


def _prepare_netns_dir() -> None:
    """Make /run/netns a shared mount, as `ip netns add` does, so that namespace mounts made
    later propagate into mount namespaces made from this one (e.g. by `ip netns exec`)."""
    global _netns_dir_ready
    if _netns_dir_ready:
        return
    with _netns_dir_lock:
        if _netns_dir_ready:
            return
        os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
        d = NETNS_DIR.encode()
        if _libc.mount(b"none", d, None, _MS_SHARED | _MS_REC, None) != 0:
            if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
                raise _fail(ctypes.get_errno(), f"make {NETNS_DIR} a shared mount")
            _check(_libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None), f"bind-mount {NETNS_DIR} on itself")
            _check(_libc.mount(b"none", d, None, _MS_SHARED | _MS_REC, None), f"make {NETNS_DIR} a shared mount")
        _netns_dir_ready = True


def _create_mount_point(path: str, what: str) -> None:
    """The empty file a new namespace is bind-mounted on; EEXIST if the namespace exists."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise _fail(errno.EEXIST, f"{what}: {path} already exists") from None
    except OSError as e:
        raise _fail(e.errno, f"{what}: create {path}") from None


@contextlib.contextmanager
def _new_netns(path: str, what: str) -> Iterator[int]:
    """Create a namespace, bind it at path (which must exist as an empty file) and run the
    block with the calling thread inside it; yields an fd of the new namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(_CLONE_NEWNET), f"{what}: unshare(CLONE_NEWNET)")
        try:
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None),
                f"{what}: bind-mount the new namespace on {path}",
            )
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            _setns_back(own)
    finally:
        os.close(own)


def _remove_netns(path: str, what: str) -> None:
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted / already gone
            raise _fail(err, f"{what}: umount {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _fail(e.errno, f"{what}: unlink {path}") from None


def _write_sysctls(items: tuple[tuple[str, str], ...], what: str) -> None:
    """Write /proc/sys/<key> for the calling thread's network namespace."""
    for key, value in items:
        try:
            fd = os.open(f"/proc/sys/{key}", os.O_WRONLY)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except FileNotFoundError:
            if key.startswith("net/ipv6/"):  # a kernel without IPv6: nothing to turn off
                continue
            raise _fail(errno.ENOENT, f"{what}: sysctl {key}") from None
        except OSError as e:
            raise _fail(e.errno, f"{what}: sysctl {key}={value}") from None

