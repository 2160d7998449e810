"""One writer per output directory: an exclusive flock on DIR/<lock file> for the whole write.

Two writers in one directory (two `sdrt build`s, two services exporting into the shared ONNX cache at start-up)
would each spend the minutes and gigabytes of the job, and the last manifest written would win. flock locks an
open file description, so it excludes other processes and other opens in this process alike, and the kernel drops
it when the holder dies: a killed writer never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from sdrt.errors import SdrtError


class DirLock:
    """`with DirLock(dir, ".build.lock", "sdrt build", timeout_s):`. Waits up to timeout_s for the holder (0: fail
    at once), calling on_wait(holder) once when it has to wait; past the timeout, an SdrtError names the holder."""

    def __init__(self, directory: Path, lock_file: str, what: str, timeout_s: float = 0.0, poll_s: float = 0.1,
                 on_wait=None, hint: str = ""):
        self.path = Path(directory) / lock_file
        self.what, self.timeout_s, self.poll_s, self.on_wait, self.hint = what, timeout_s, poll_s, on_wait, hint
        self._f = None

    def __enter__(self) -> DirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:  # a read-only or foreign directory: say so in one line
            raise SdrtError(f"cannot write {self.path}: {e.strerror or e}") from None
        deadline, waited = time.monotonic() + self.timeout_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    f.close()
                    raise SdrtError(f"another `{self.what}` ({holder}) is writing {self.path.parent}; waited "
                                    f"{self.timeout_s:g} s{self.hint}") from None
                if not waited and self.on_wait is not None:
                    self.on_wait(holder)
                waited = True
                time.sleep(self.poll_s)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None
