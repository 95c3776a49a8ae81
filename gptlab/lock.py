"""One writer per directory: an exclusive lock file that names its holder (host, pid).

Used for a training workdir (WORKDIR/.writer.lock, taken by `train.run_experiment`),
by sweeps (their workdir and each running cell), and, waited on, around preparing a
dataset (parallel sweep cells share one data dir).

How it works, and why it also holds on shared filesystems:
- The lock is `flock(LOCK_EX | LOCK_NB)` on the file. The kernel drops it when the
  holder dies, also after kill -9, so a dead holder never blocks anyone and no stale
  file needs judging. On NFS, Linux implements flock with the protocol's own
  byte-range locks (NLM for v3, native for v4), so two hosts exclude each other, and
  the server frees a dead client's locks when its lease expires. A child process
  that inherits the descriptor holds the lock with its parent (sweeps rely on this).
- Where the filesystem refuses flock (ENOLCK/ENOSYS/EOPNOTSUPP: e.g. Lustre without
  `-o flock`), the file's existence is the lock: it is created with O_CREAT|O_EXCL,
  atomic on every POSIX filesystem and on NFSv3+, and removed at release. A lock left
  by a dead process is taken over only when that is provable: same host and (the
  boot id differs, or the pid is gone, or the pid now belongs to a later process).
  The take-over renames the stale file to a unique name first, so of two processes
  taking over at once exactly one succeeds. A lock from another host cannot be
  judged from here: the refusal says so and names the file to delete.
- The file holds a JSON record of the holder (host, pid, boot id, process start
  time, command), written only after the lock is held: a refused process changes
  nothing.
"""
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

_FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class LockHeld(OSError):
    """The lock is held by a live process (or one that cannot be proven dead); `holder` describes it."""

    def __init__(self, path, holder: dict, hint: str = ""):
        self.path, self.holder = pathlib.Path(path), holder
        super().__init__(errno.EWOULDBLOCK, f"{self.path} is held by {describe(holder)}{hint}")


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int):
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "process_start": _process_start(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def read_holder(path) -> dict:
    """The record in a lock file ({} if none or unreadable; a bare pid, as older sweeps wrote, is read too)."""
    try:
        text = pathlib.Path(path).read_text().strip()
    except OSError:
        return {}
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {"pid": record} if isinstance(record, int) else record if isinstance(record, dict) else {}


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f" (started {holder['started']})"
    return text


def _provably_dead(holder: dict) -> bool:
    if not holder.get("pid") or holder.get("host") != socket.gethostname():
        return False
    if holder.get("boot_id") and holder["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    start = _process_start(holder["pid"])
    if start is None:
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return holder.get("process_start") is not None and start != holder["process_start"]  # a reused pid


class FileLock:
    """Holds the exclusive lock on `path` until `release()`, or raises LockHeld (an OSError).

    `record`: write this process's record into the file once held. `fd` is the open
    descriptor (flock mode), which a child process may inherit to share the lock.
    """

    def __init__(self, path, record: bool = True):
        self.path = pathlib.Path(path)
        self.fd, self.exclusive_file = None, False
        try:
            fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            fd, created = os.open(self.path, os.O_RDWR), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise LockHeld(self.path, read_holder(self.path)) from None
            if e.errno not in _FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            if created:  # the exclusive create above was the lock
                self.fd, self.exclusive_file = fd, True
            else:
                os.close(fd)
                self._create_exclusive()
        else:
            self.fd = fd
        self._previous = None  # the record of the last holder, which `restore_record` puts back
        if not created and not self.exclusive_file:
            try:
                self._previous = os.pread(self.fd, 1 << 16, 0)
            except OSError:
                pass
        if record:
            self.record(this_process())

    def _create_exclusive(self) -> None:
        """The fallback where flock is unsupported: the file's existence is the lock."""
        for _ in range(3):
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.exclusive_file = True
                return
            except FileExistsError:
                pass
            holder = read_holder(self.path)
            if not _provably_dead(holder):
                hint = ("" if holder.get("host") in (None, socket.gethostname()) else
                        f"; if that process is gone, delete {self.path}")
                raise LockHeld(self.path, holder, hint)
            stale = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
            try:
                os.rename(self.path, stale)  # atomic: of two processes taking over, one moves the file
            except FileNotFoundError:
                continue
            if read_holder(stale) != holder:  # someone took it over meanwhile: give theirs back
                try:
                    os.link(stale, self.path)
                except FileExistsError:
                    pass
            os.unlink(stale)
        raise LockHeld(self.path, read_holder(self.path))

    def record(self, holder: dict) -> None:
        """Writes `holder` as the lock's record (e.g. the child process that now works under it)."""
        data = json.dumps(holder).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def restore_record(self) -> None:
        """Puts back the record the file held before this process took the lock, so that a start refused
        before it wrote anything leaves the directory byte-identical (a file this lock created is emptied;
        in the exclusive-file mode release removes it anyway)."""
        if self.fd is None or self.exclusive_file:
            return
        os.ftruncate(self.fd, 0)
        if self._previous:
            os.pwrite(self.fd, self._previous, 0)

    def release(self) -> None:
        if self.fd is None:
            return
        if self.exclusive_file:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # drops the flock (unless a child inherited the descriptor)
        self.fd = None


def is_locked(path) -> bool:
    """Whether a live process holds the lock on `path` (taking and dropping it, recording nothing)."""
    if not pathlib.Path(path).exists():
        return False
    try:
        FileLock(path, record=False).release()
        return False
    except LockHeld:
        return True


def wait_for(path, on_wait=None, poll_s: float = 0.5) -> FileLock:
    """Takes the lock on `path`, waiting as long as a live process holds it.

    `on_wait(holder_description)` is called once, when the first attempt finds it held. A
    holder that dies releases the lock (flock), so the wait ends without anyone judging it.
    """
    told = False
    while True:
        try:
            return FileLock(path)
        except LockHeld as held:
            if not told and on_wait is not None:
                on_wait(describe(held.holder))
            told = True
        time.sleep(poll_s)
