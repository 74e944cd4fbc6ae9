"""What Linux's /proc says about a process: alive or not, its command line, children and memory.

Every reader answers for a process that ends while it reads as for one already gone (None, False
or nothing), since any pid may exit between a listing and a look; likewise for one whose files
this user may not read. (Reading a file of an ended process raises FileNotFoundError, or
ProcessLookupError mid-read; another user's, PermissionError: all of them OSError.)
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
# The size of a memory page, the unit of /proc/<pid>/statm.
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Thread states of a thread that has exited: a zombie waiting for its parent, or dead.
_EXITED_STATES = frozenset({"Z", "X"})


def pids() -> list[int]:
    """Every process of this machine (of this pid namespace)."""
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def command_line(pid: int) -> bytes | None:
    """The process's arguments, each ended by a NUL byte; None once it has ended."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def environment(pid: int) -> list[bytes]:
    """The process's environment at its start, as `NAME=value` entries; none once it has ended."""
    try:
        return (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return []


def is_running(pid: int) -> bool:
    """Whether any thread of `pid` is still alive (a zombie waiting for its parent is not)."""
    # The main thread can be a zombie while other threads still exit, holding the sockets open.
    try:
        threads = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return False
    for thread in threads:
        try:
            stat = (thread / "stat").read_text()
        except OSError:  # the thread ended while we read it
            continue
        # The state follows the command name, in parentheses, which may hold any character.
        if stat.rpartition(")")[2].split()[0] not in _EXITED_STATES:
            return True
    return False


def children(pid: int) -> list[int]:
    """The pids of a process's children, forked by any of its threads, in order."""
    found: list[int] = []
    try:
        threads = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return found
    for thread in threads:
        try:
            found += [int(child) for child in (thread / "children").read_text().split()]
        except OSError:  # the thread ended while we read it
            continue
    return sorted(found)


def resident_bytes(pid: int) -> int | None:
    """The process's resident memory now; None once it has ended."""
    try:
        # statm: size, resident, shared, ... in pages.
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):  # an exiting process's statm may be empty
        return None


def peak_resident_kib(pid: int) -> int | None:
    """The process's peak resident memory (VmHWM) in KiB; None once it has ended."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])  # "VmHWM:   123456 kB"
    return None  # a zombie has no memory left to report
