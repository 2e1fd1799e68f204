"""One user-facing error type: a full sentence naming the thing, plus a hint for the fix.

The CLI prints these without a traceback (`--debug` shows one) and exits with `exit_code`:
0 ok, 2 bad input or config, 3 host unreachable, the task's own code when a task fails.
"""

from __future__ import annotations


class CubeError(Exception):
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(CubeError):
    """Bad mlcube.yaml / metadata.yaml / inventory / playbook: names file, field, line, fix."""

    def __init__(self, file, message: str, hint: str | None = None, *, field: str | None = None,
                 line: int | None = None):
        where = str(file)
        if line is not None:
            where += f":{line}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}", hint)
        self.file, self.field, self.line = file, field, line


class HostUnreachable(CubeError):
    exit_code = 3


class TaskFailed(CubeError):
    """A task exited non-zero; the CLI exits with the task's own code."""

    def __init__(self, task: str, code: int, hint: str | None = None):
        super().__init__(f"Task '{task}' failed with exit code {code}.", hint, exit_code=code or 1)
        self.task, self.code = task, code
