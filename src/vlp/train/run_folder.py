"""A training run's folder: the lock that keeps a second run out, and its metrics log.

    OUT/run.lock        held while a run writes here: process id, host and start time
    OUT/run.yaml        the run's configuration
    OUT/metrics.jsonl   one JSON record per log step
    OUT/checkpoints/    step_N/ checkpoint folders
    OUT/evals/          evaluations during training: <name>/step_N.json
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from vlp.checkpoint import CHECKPOINTS_DIR

log = logging.getLogger("vlp.train")

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run.yaml"
EVALS_DIR = "evals"


class RunFolderInUse(RuntimeError):
    """Another live process writes to the run folder; the message names it."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# Lock files held by this process. A forked child (a data loader worker) would share the lock with its
# parent and keep it after a kill -9 of the parent until it noticed, seconds later: children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """An exclusive lock on a run folder for the life of a run, released on exit.

    The lock is an advisory `flock` on `run.lock`, which the kernel drops when its process dies, so a
    killed run never blocks its own resume. The file names the holder (process id, host, start time)
    for the message a second run gets. Where the file system has no `flock` (some network mounts), the
    process id decides: a lock whose process is gone on this host is stale and taken over.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise RunFolderInUse(self._in_use_message(holder)) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                self._check_holder_by_pid(os.read(fd, 4096).decode(errors="replace"))
            # Locked; but if the previous holder removed the file meanwhile, this is a lock on nothing.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            log.warning("took over the lock of a run that ended without releasing it (%s)", previous)
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        return self

    def _in_use_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            who = f"process {info['pid']} on {info['host']}, started {info['started']}"
        except (json.JSONDecodeError, KeyError, TypeError):
            who = "another process"
        return (f"run folder {self.folder} is in use by another vlp run ({who}): wait for it to end, "
                "or give this run another --out")

    def _check_holder_by_pid(self, holder: str) -> None:
        """Without flock: refuse when the recorded process still runs (or runs on another host)."""
        try:
            info = json.loads(holder)
        except json.JSONDecodeError:
            return  # empty or torn: nobody holds it
        if info.get("host") != socket.gethostname() or _process_alive(int(info.get("pid", -1))):
            raise RunFolderInUse(self._in_use_message(holder) + f"; if no run is alive, delete {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            _HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# What a run leaves in its folder (besides its lock).
RUN_FILES = (METRICS_FILE, RUN_CONFIG_FILE, CHECKPOINTS_DIR, EVALS_DIR)


def replace_earlier_run(folder: Path, overwrite: bool) -> str | None:
    """None when `folder` holds no earlier run, or when it did and `overwrite` removed that run's files;
    else why a new run may not start there."""
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return None
    if not overwrite:
        return (f"run folder {folder} holds an earlier run ({', '.join(found)}): continue it with --resume latest, "
                "replace it with --overwrite, or give this run another --out")
    log.warning("--overwrite: removing the earlier run in %s (%s)", folder, ", ".join(found))
    for name in found:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a line that does not parse (the torn last line of a killed run)
    is dropped with a warning."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            where = "its last line, cut short when the run was killed" if number == len(lines) else f"line {number}"
            log.warning("%s: dropped %s", path, where)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: a resumed run drops what a killed run logged after its last checkpoint."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
