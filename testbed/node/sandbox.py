"""The sandbox of a `command:` container, run by the kubelet as `python -I -S sandbox.py READY_FD`.

Standard library only and no svclab import, so it starts in ~15 ms. As root it:

1. reads its configuration from READY_FD, which the kubelet writes only once it has put this
   process's pid in the pod's cgroups, so everything it starts is inside them (`ip netns
   exec` would remount /sys, and with it the cgroup file systems, before the command ran);
2. joins the pod's network namespace and makes its own mount, PID, UTS (hostname: the pod's
   name), IPC and cgroup namespaces (the pod's cgroup is its /);
3. in the new mount namespace: a fresh sysfs (read-only, no cgroup trees), the pod's
   resolv.conf over /etc/resolv.conf, private tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock,
   and an empty read-only tmpfs over every `hide` path (svclab's state, /run/netns,
   /etc/netns: what would show the cluster or other pods);
4. forks the pod's init (PID 1 of the new PID namespace), which mounts a /proc of the pod's
   own processes, forks the command as `uid`/`gid` and reaps every process of the pod;
   SIGTERM and the like are forwarded to the command, and init exits with the command's
   status (128 + signal when killed), which ends the pod's other processes.

This process stays outside the PID namespace, forwards the same signals to init and exits
with init's status. Both stay out of the OOM killer's way (oom_score_adj -998, as the
kubelet's pause container): over its memory limit, the kernel kills a process of the
command, not the sandbox.
"""

from __future__ import annotations

import _signal as signal  # the C module: signal.py's enums cost 3.5 ms of a ~20 ms start
import ctypes
import marshal
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SANDBOX_OOM_SCORE_ADJ = -998
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: Private, writable for everyone (sticky), sized like Docker's /dev/shm for shared memory.
PRIVATE_DIRS = {"/tmp": "size=256m", "/var/tmp": "size=256m", "/dev/shm": "size=64m", "/run/lock": "size=1m"}
HOSTNAME_MAX = 63

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), target.encode(), encode(fstype), flags, encode(data)), f"mount {target}")


def _read_config(ready_fd: int) -> dict:
    """Block until the kubelet placed this process in the pod's cgroups; it then writes the
    configuration (marshal: no import, unlike json's 6 ms) and closes the pipe. Nothing read:
    the kubelet gave up on the pod."""
    with os.fdopen(ready_fd, "rb") as ready:
        data = ready.read()
    if not data:
        raise SystemExit("sandbox: the kubelet did not place the pod in its cgroups")
    return marshal.loads(data)


def _enter_namespaces(config: dict) -> None:
    fd = os.open(config["netns"], os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {config['netns']}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP), "unshare")
    hostname = config["hostname"][:HOSTNAME_MAX].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")


def _set_up_mounts(config: dict) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _check(_libc.umount2(b"/sys", MNT_DETACH), "umount /sys")
    _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if config.get("resolv_conf"):
        _mount(config["resolv_conf"], "/etc/resolv.conf", None, MS_BIND)
    for path, size in PRIVATE_DIRS.items():
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777")
    for path in sorted(config.get("hide", []), key=len):
        if os.path.isdir(path):  # gone when under a path hidden or replaced before
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _fork_forwarding(child, config: dict) -> int:  # child: (dict) -> None; no typing import at start
    """Fork child(config) and forward FORWARDED signals to it, those that came before the fork
    included (they are queued until its pid is known); returns its pid."""
    early: list[int] = []
    target: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not target:
            early.append(signum)
            return
        try:
            os.kill(target[0], signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    pid = os.fork()
    if pid == 0:
        child(config)
    target.append(pid)
    for signum in early:
        os.kill(pid, signum)
    return pid


def _set_oom_score_adj(value: int) -> None:
    """Lowering it needs CAP_SYS_RESOURCE, which some machines withhold even from root: then
    every process of the pod keeps the kubelet's score, and the OOM killer takes the largest."""
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(value))
    except PermissionError:
        pass


def _execvpe(argv: list[str], env: dict[str, str]) -> None:
    """execvp's search of PATH, without os.execvpe: that imports warnings, which the command,
    no longer root, may not be able to read (a Python installed under /root)."""
    name = argv[0]
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in env.get("PATH", "").split(":")]
    error: OSError = FileNotFoundError(2, f"{name}: not found in PATH")
    for candidate in candidates:
        try:
            os.execve(candidate, argv, env)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            error = exc if not isinstance(error, PermissionError) else error  # EACCES wins, as in execvp
    raise error


def _exec_command(config: dict) -> None:
    """In the forked child: default signal handling, the command's own OOM score, its user."""
    try:
        for signum in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        _set_oom_score_adj(0)
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        os.chdir("/")
        _execvpe(config["argv"], config["env"])
    except OSError as exc:
        os.write(2, f"sandbox: cannot run {config['argv'][0]!r}: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


def _run_init(config: dict) -> None:
    """PID 1 of the pod: /proc, the command, reaping, forwarding; exits with the command."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        pid = _fork_forwarding(_exec_command, config)
        while True:
            try:
                reaped, status = os.wait()
            except ChildProcessError:
                os._exit(0)
            if reaped == pid:
                os._exit(_exit_code(status))
    except BaseException as exc:  # noqa: BLE001 - PID 1 must not print a traceback and linger
        os.write(2, f"sandbox init: {exc}\n".encode())
        os._exit(125)


def main(argv: list[str]) -> int:
    _set_oom_score_adj(SANDBOX_OOM_SCORE_ADJ)
    config = _read_config(int(argv[1]))
    _enter_namespaces(config)
    _set_up_mounts(config)
    pid = _fork_forwarding(_run_init, config)
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except OSError as exc:
        print(exc, file=sys.stderr)
        sys.exit(125)
