"""Waiting for a command the probe started: one rule for a timeout, shared by its callers."""

from __future__ import annotations

import subprocess


def communicate(proc, timeout):
    """(exit code, stdout, stderr) as text; exit code None when it ran past the timeout (the
    command is then killed)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
