"""`ENTRAFLOW_HOME` and the files entraflow keeps: readable by the user it runs as, nobody else.

The home holds the SQLite database (run history with user names, encrypted tokens), the
embedded Redis's data and the processes' logs. Folders are made 0700 and files 0600 when created,
and a home or file made looser before (by an older entraflow) is tightened when next used.
Only what this user owns is changed: a database put in a shared folder leaves that folder alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600
# SQLite gives its journal, WAL and shared-memory files the database file's mode when it creates
# them, but leaves alone those an older entraflow left behind.
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def private_home(home: Path) -> Path:
    """Create the home 0700 if missing, else tighten it to 0700; return its absolute path."""
    home = home.resolve()
    private_folder(home)
    tighten(home, FOLDER_MODE)
    return home


def private_folder(path: Path) -> None:
    """Create `path` and each missing parent 0700; folders that exist are left as they are."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        # mkdir's mode passes through the umask: chmod says exactly what we mean.
        folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
        tighten(folder, FOLDER_MODE)


def private_file(path: Path) -> None:
    """Create an empty `path` 0600 if missing, else tighten it to 0600."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.close(descriptor)
    tighten(path, FILE_MODE)


def private_contents(folder: Path) -> None:
    """Create `folder` 0700 or tighten it, and tighten each regular file in it to 0600."""
    private_folder(folder)
    tighten(folder, FOLDER_MODE)
    for entry in folder.iterdir():
        with suppress(FileNotFoundError):
            if stat.S_ISREG(entry.lstat().st_mode):  # a symlink is not ours to change
                tighten(entry, FILE_MODE)


@contextmanager
def open_private(path: Path) -> Iterator[int]:
    """`path` opened for writing, created 0600 if it is not there; never through a symlink."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)
        yield descriptor
    finally:
        os.close(descriptor)


def write_private(path: Path, text: str) -> None:
    """`text` into `path`, 0600, whole or not at all.

    Written beside it and renamed over it: a process reading it meanwhile, or after a crash
    mid-write, never finds the file empty or cut short.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)  # left by a crash of a process that had this pid
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.write(descriptor, text.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def private_database(path: Path, home: Path) -> None:
    """Make a SQLite file and its side files 0600, its folder 0700 (and tightened if the home)."""
    if path.parent.resolve() == home.resolve():
        private_home(home)
    else:
        private_folder(path.parent)
    private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        tighten(path.with_name(path.name + suffix), FILE_MODE)


def tighten(path: Path, mode: int) -> None:
    """Take away whatever `mode` does not grant, if `path` exists and belongs to this user."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return
    if status.st_uid != os.geteuid():
        return
    current = stat.S_IMODE(status.st_mode)
    if current & ~mode:
        os.chmod(path, current & mode)
