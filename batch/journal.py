"""The output file is the job's journal: append-only, one complete JSON line per finished request, fsync'd
after every write, locked (fcntl.flock) for as long as a run holds it.

A run killed at any instant (kill -9, power loss) leaves every line it fsync'd intact; at worst the one
line being written is torn. Opening the file again drops a torn tail (bytes after the last newline),
reads which input lines are answered, and the run continues with the rest: nothing is redone,
duplicated or lost. A second run on the same output while the first holds it is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

from flashmoe.errors import CapacityError, InputError
from flashmoe.hub.common import signals_held

from .output import line_of


class OutputLog:
    """Open (creating) and lock OUTPUT, recover it; `done` maps input line -> custom_id already answered."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = -1
        self.created = not os.path.lexists(self.path)
        # the one file flashmoe opens in a user's directory for writing without a rename: the journal is
        # resumed in place, so it must be a regular file of its own (never a link, a device, a FIFO)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if os.path.islink(self.path):
                raise InputError(f"{self.path} is a link; give the real path of the output file as -o") from None
            raise InputError(f"cannot write {self.path} ({e.strerror or e}); give an -o on a writable disk") from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise InputError(f"{self.path} is not a regular file; give a file path as -o (the output is "
                                 "resumed, so it must be a file)")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.created = False
                raise InputError(f"{self.path} is in use by another flashmoe-batch run; wait for it to finish, "
                                 "or give a different -o") from None
            if self.created:
                _fsync_dir(self.path.parent)
            self.done: dict[int, str | None] = {}
            self.errors = 0  # how many of the recovered lines are error lines
            self.dropped_bytes = self._recover()
        except BaseException:
            self.close(failed=True)
            raise

    def _recover(self) -> int:
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
        dropped = size - end
        if dropped:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
            try:
                rec = json.loads(raw)
                n = line_of(rec)
            except ValueError:
                rec, n = None, None
            if n is None:
                raise InputError(f"{self.path} line {i} is not a flashmoe-batch output record; it was edited or "
                                 "written by something else. Give a new -o, or remove that line to resume")
            if n in self.done:
                raise InputError(f"{self.path} answers input line {n} twice (its line {i}); remove one of the "
                                 "two lines to resume")
            self.done[n] = rec.get("custom_id")
            self.errors += rec.get("error") is not None
        return dropped

    def append(self, records: list[dict]) -> None:
        """Write whole lines in one write() and fsync: after it returns they survive any crash."""
        if not records:
            return
        buf = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        start = os.fstat(self.fd).st_size
        view = memoryview(buf)
        try:
            with signals_held():  # Ctrl-C / SIGTERM: after the lines are written whole and fsync'd
                while view:
                    view = view[os.write(self.fd, view):]
                os.fsync(self.fd)
        except OSError as e:  # disk full, I/O error: leave no partial line behind
            os.ftruncate(self.fd, start)
            raise CapacityError(f"cannot write {self.path} ({e.strerror or e}); free space or fix the disk, then "
                                "run the same command again to resume") from None

    def close(self, failed: bool = False) -> None:
        """Unlock. `failed`: the run did not get going; an output this run created and left empty is removed."""
        if self.fd >= 0:
            if failed and self.created and os.fstat(self.fd).st_size == 0:
                self.path.unlink(missing_ok=True)  # still locked: no other run has it
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
