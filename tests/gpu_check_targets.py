"""Checks for ``tests/test_gpu_check.py``'s run of ``gpu_check.run_checks``: each runs in a ``gpu-check`` child
process (importable there through PYTHONPATH), standard library only so that a child starts in a fraction of a second."""

import os
import subprocess
import sys
import time


def works(ctx):
    """A row carrying what the runner handed the check (its context and its share of the budget)."""
    return {"rows": [{"ranks": ctx["ranks"], "timeout_s": ctx["timeout_s"], "pid": os.getpid()}],
            "notes": ["a note"], "skipped": {"a part": "not on this device"}}


def raises(ctx):
    raise ValueError("boom\nsecond line\nthe root cause")


def skips(ctx):
    from curry_train.bench.gpu_check import CheckSkipped

    raise CheckSkipped("nothing to run here")


def exits(ctx):
    os._exit(3)


def hangs(ctx):
    """A hang with a grandchild (as spawned ranks are): its pid goes to ``ctx["pid_file"]``."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(ctx["pid_file"], "w") as f:
        f.write(str(child.pid))
    time.sleep(600)
