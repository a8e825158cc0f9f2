"""One writer per run directory: an advisory lock file that holds the writer's pid."""

import errno
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_NAME", "RunDirectoryLocked", "RunLock"]

LOCK_NAME = ".lock"


class RunDirectoryLocked(RuntimeError):
    """Another live process is writing this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """An exclusive lock on a run directory for as long as a run writes it.

    The lock is ``flock`` on ``<run_dir>/.lock``, which records the holder's pid and host. The
    kernel drops the lock when its holder dies, however it dies (``SIGKILL`` included), so a
    lock file left behind by a dead run is stale by construction and is taken over; where
    ``flock`` is not available the recorded pid is checked instead.

    Use as a context manager, or :meth:`acquire` / :meth:`release`.

    :raises RunDirectoryLocked: from :meth:`acquire` when a live process holds the lock; the
        message names it and the lock file.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().split()
        except OSError:
            text = []
        pid = text[0] if text else "?"
        host = text[1] if len(text) > 1 else "?"
        return f"process {pid} on {host}"

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise RunDirectoryLocked(self._message()) from None
            else:  # pragma: no cover - Windows
                text = os.read(fd, 256).decode(errors="replace").split()
                if text and text[0].isdigit() and int(text[0]) != os.getpid():
                    if _pid_alive(int(text[0])):
                        raise RunDirectoryLocked(self._message())
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _message(self) -> str:
        return (
            f"{self.path.parent} is being written by {self._holder()} (lock file {self.path}); "
            "wait for it to finish, stop it, or choose another run directory"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Emptied while still held: a reader never sees the pid of a finished run.
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
