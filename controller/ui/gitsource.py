"""A cube from a git URL: a shallow clone with a timeout into a folder of its own.

Only https://, ssh:// and file:// URLs are accepted (no `ext::` helpers, no bare paths, no
option-looking arguments), git never prompts (no TTY behind a web server), and the protocol
allow-list also binds submodules, which are not fetched anyway.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from controller.errors import CubeError

ALLOWED_SCHEMES = ("https://", "ssh://", "file://")
CLONE_TIMEOUT_S = 120.0


def check_url(url: str) -> str:
    url = url.strip()
    if not url.startswith(ALLOWED_SCHEMES):
        raise CubeError(f"Git URL '{url}' is not accepted: only https://, ssh:// and file:// "
                        "URLs are.", "For example https://github.com/org/repo.git.")
    if re.search(r"[\s\x00-\x1f]", url):
        raise CubeError("The git URL holds spaces or control characters.")
    return url


def clone(url: str, dest: Path, *, timeout: float = CLONE_TIMEOUT_S,
          ref: str | None = None) -> Path:
    """Clone `url` (optionally branch or tag `ref`) into `dest`, which must not exist."""
    url = check_url(url)
    if shutil.which("git") is None:
        raise CubeError("git is not installed on this machine.", "apt-get install git")
    argv = ["git", "-c", "protocol.allow=never", "-c", "protocol.https.allow=always",
            "-c", "protocol.ssh.allow=always", "-c", "protocol.file.allow=always",
            "clone", "--quiet", "--depth", "1", "--no-recurse-submodules"]
    if ref:
        if ref.startswith("-"):
            raise CubeError(f"Git ref '{ref}' is not a branch or tag name.")
        argv += ["--branch", ref]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0",
           "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=15"}
    try:
        proc = subprocess.run([*argv, "--", url, str(dest)], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        shutil.rmtree(dest, ignore_errors=True)
        raise CubeError(f"git clone of {url} did not finish within {timeout:g} s.",
                        "Check the URL and that this machine can reach it.") from None
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise CubeError(f"git clone of {url} failed: {last}",
                        "Check the URL, and that this machine may read the repository.")
    return dest
