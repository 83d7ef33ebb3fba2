"""One flywheel per data directory: an exclusive lock that names its holder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pld_core.errors import PLDError


class DataDirInUse(PLDError):
    """Another flywheel holds the data directory: nothing was done (a scheduled run ends cancelled, not failed)."""


@contextlib.contextmanager
def data_lock(root: Path):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".flywheel.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise DataDirInUse(f"{root} is in use by another flywheel ({holder}). Fix: wait for it to finish, or use another flywheel.data_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    fh.flush()
    try:
        yield path
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
