"""
How nanopath writes files, so that a crash, a kill or a full disk never leaves a file half-written and two jobs
never write one folder at once: atomic_write (every file any script writes goes through it) and lock_folder.
"""
import errno
import fcntl
import os
import shutil
import socket


def atomic_write(path, write, size_hint=None):
    """Write a file so that a reader sees either the old file or the whole new one, never a part of it: write(f)
    fills a temporary file beside `path`, which is fsynced and renamed over it (atomic on POSIX). On any failure
    (a full disk, an exception, a kill) the old file stays and no temporary file is left to be trusted later; a
    full disk is reported as such, with the free space and, if given, the bytes the file needs."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            need = f", about {size_hint / 2**30:.2f} GiB needed" if size_hint else ""
            raise OSError(errno.ENOSPC, f"No space left on device writing {path} "
                          f"({shutil.disk_usage(folder).free / 2**30:.2f} GiB free{need}); the previous file is "
                          "kept: free some space and run the same command again") from None
        raise
    fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_folder(folder, name=".lock", wait=False, what="another process"):
    """An exclusive lock on folder/name, held until the returned file is closed or the process ends (the kernel
    drops it, even after kill -9); the file names its holder. wait=False: a second taker stops at once, naming the
    holder; wait=True: it waits until the holder is done."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, name), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"{folder} is in use by {what} ({holder}): wait for it to end, or use another "
                         "folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}")
    f.flush()
    return f
