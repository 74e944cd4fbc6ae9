"""The peak resident memory of a Python child process, as the child itself measured it.

Not wait4's `ru_maxrss`: the kernel starts a forked child's count from its parent's high-water
mark, so late in a full suite every child "peaked" at pytest's own 350 MiB. The child reads its
own VmHWM at exit instead (exec starts it afresh).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

KIB = 1024

# Runs argv[2] as __main__ with argv[3:], and at exit writes its VmHWM (KiB) to argv[1].
_MEASURING = """
import atexit, os, sys
from entraflow.process_info import peak_resident_kib
peak_path, code = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
def report():
    with open(peak_path, "w") as out:
        out.write(str(peak_resident_kib(os.getpid())))
atexit.register(report)
exec(compile(code, "<measured>", "exec"), {"__name__": "__main__"})
"""

# `code` that runs the entraflow command line.
ENTRAFLOW_CLI = "import runpy; runpy.run_module('cli', run_name='__main__')"


def run_measuring_peak(
    code: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: IO[bytes],
    stderr: IO[bytes] | int,
    peak_path: Path,
) -> tuple[int, float]:
    """Run `code` with `args` in a new Python; its exit code and peak resident memory in MiB."""
    command = [sys.executable, "-c", _MEASURING, str(peak_path), code, *args]
    completed = subprocess.run(command, env=env, stdout=stdout, stderr=stderr, check=False)
    return completed.returncode, int(peak_path.read_text()) / KIB
