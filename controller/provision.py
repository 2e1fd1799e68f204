"""Declarative, idempotent provisioning: YAML playbooks run through an executor.

A playbook is `{name, description?, check?, vars?, on_failure?, steps: [{name, run, check?,
when?, timeout?}]}`. Commands are Jinja2 templates in which every `{{ expr }}` is shell-quoted
(lists become separately quoted words; `{{ x | raw }}` opts out), so a hostile value such as a
requirement `x; rm -rf /` stays one word. A step runs unless its `check` command exits 0 (then
it is skipped, with the reason recorded) or its `when` Jinja expression is false; a playbook
`check` that passes skips every step. `vars` gives defaults (strings are templates over the
caller's variables and `run_id`, a fresh token per run for temporary names); `on_failure` runs
after a failed step to clean up. Checks must not change anything: dry runs execute them.

The same runner serves this machine (LocalTarget, alias LocalExecutor) and hosts (HostTarget):
all it needs of a Target is `sh(command, timeout=None) -> ExecResult` (the Executor protocol).
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.errors import ConfigError, CubeError
from controller.paths import playbooks_dir
from controller.target import ExecResult, Executor, LocalTarget  # noqa: F401 (re-exported)

TAIL_LINES = 20
STEP_KEYS = {"name", "run", "check", "when", "timeout"}
PLAYBOOK_KEYS = {"name", "description", "check", "vars", "on_failure", "steps"}


# `cube run` provisions this machine: its Target is the Executor (kept under its old name).
LocalExecutor = LocalTarget


@dataclass
class Step:
    name: str
    run: str
    check: str | None = None
    when: str | None = None
    timeout: float | None = None
    line: int | None = None


@dataclass
class Playbook:
    name: str
    path: Path
    steps: list[Step]
    vars: dict[str, Any] = field(default_factory=dict)
    check: str | None = None
    on_failure: str | None = None
    description: str = ""


@dataclass
class StepResult:
    name: str
    status: str            # "ran" | "skipped" | "would-run" | "not-applicable"
    reason: str = ""
    command: str = ""
    result: ExecResult | None = None


class StepFailed(CubeError):
    """A playbook step's command exited non-zero; carries the step, command and result."""

    def __init__(self, playbook: Playbook, step: Step, command: str, result: ExecResult):
        tail = "\n".join(result.output.rstrip().splitlines()[-TAIL_LINES:])
        msg = (f"Provisioning step '{step.name}' of playbook '{playbook.name}' ({playbook.path}) "
               f"failed with exit code {result.code}.\n  command: {_one_line(command)}\n"
               f"  last output:\n{_indent(tail or '(no output)')}")
        super().__init__(msg, "Fix the cause shown in the output above, then run again.")
        self.step, self.command, self.result = step.name, command, result


def _one_line(command: str) -> str:
    lines = command.strip().splitlines()
    return lines[0] + (f" ... (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# ---- loading and validation -------------------------------------------------------------------

def resolve_playbook(name_or_path: str | Path, base: Path | None = None) -> Path:
    """`python` -> playbooks/python.yaml; a path (absolute, or relative to `base`) is used as is."""
    text = str(name_or_path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        path = playbooks_dir() / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in playbooks_dir().glob("*.yaml"))) or "none"
            raise CubeError(f"Unknown playbook '{text}'. Built-in playbooks: {known}.",
                            "Give a built-in name or a path to a playbook YAML file.")
        return path
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise CubeError(f"Playbook file {path} does not exist.",
                        "Playbook paths in metadata.yaml are relative to the cube folder.")
    return path


def load_playbook(name_or_path: str | Path, base: Path | None = None) -> Playbook:
    path = resolve_playbook(name_or_path, base)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(path, f"is not valid YAML: {getattr(err, 'problem', err)}.",
                          "Fix the YAML syntax at that line.",
                          line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError(path, "must be a mapping with 'name' and 'steps'.",
                          "See playbooks/python.yaml for an example.")
    return _parse_playbook(path, data, _step_lines(root))


def _parse_playbook(path: Path, data: dict, lines: list[int]) -> Playbook:
    unknown = sorted(set(data) - PLAYBOOK_KEYS)
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)}.",
                          f"Valid keys: {', '.join(sorted(PLAYBOOK_KEYS))}.", field=unknown[0])
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(path, "needs a non-empty list of steps.",
                          "Add `steps:` with items like `- {name: ..., run: ...}`.", field="steps")
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError(path, "must be a mapping of variable defaults.", field="vars")
    for key in ("check", "on_failure"):
        _need_str(path, data, key, key, None, required=False)
    parsed = [_parse_step(path, i, s, lines[i] if i < len(lines) else None)
              for i, s in enumerate(steps)]
    return Playbook(name=str(data.get("name") or path.stem), path=path, steps=parsed,
                    vars=variables, check=data.get("check"), on_failure=data.get("on_failure"),
                    description=str(data.get("description") or ""))


def _parse_step(path: Path, index: int, raw, line: int | None) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a mapping with 'name' and 'run'.", field=where, line=line)
    unknown = sorted(set(raw) - STEP_KEYS)
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)}.",
                          f"Valid step keys: {', '.join(sorted(STEP_KEYS))}.",
                          field=f"{where}.{unknown[0]}", line=line)
    name = _need_str(path, raw, "name", f"{where}.name", line)
    for key in ("run", "check", "when"):
        _need_str(path, raw, key, f"{where}.{key}", line, required=key == "run")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise ConfigError(path, "must be a number of seconds.", field=f"{where}.timeout", line=line)
    return Step(name=name, run=raw["run"], check=raw.get("check"), when=raw.get("when"),
                timeout=timeout, line=line)


def _need_str(path, data: dict, key: str, field_name: str, line, required=True):
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, "must be a non-empty string.",
                          f"Set `{key}:` to a shell command or text.", field=field_name, line=line)
    return value


def _step_lines(root) -> list[int]:
    """1-based line of each item under `steps:`, for error messages (PyYAML keeps node marks)."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "steps" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


# ---- rendering -------------------------------------------------------------------------------

class Raw(str):
    """Marks a value that goes into the command unquoted (`{{ x | raw }}`)."""


def shell_quote(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return "''"
    if isinstance(value, (list, tuple)):
        return " ".join(shell_quote(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(str(value))


def _raw(value: Any) -> Raw:
    if isinstance(value, (list, tuple)):
        return Raw(" ".join(str(v) for v in value))
    return Raw("" if value is None else str(value))


def _jinja(quote: bool):
    # jinja2 loads only when a playbook runs: a warm `cube run` reuses its env without one.
    import jinja2  # noqa: PLC0415

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False, finalize=shell_quote if quote else None)
    env.filters["raw"] = _raw
    env.filters["quote"] = shell_quote
    return env


_ENVS: dict[bool, Any] = {}


def _env(quote: bool):
    if quote not in _ENVS:
        _ENVS[quote] = _jinja(quote)
    return _ENVS[quote]


def render(template: str, variables: dict, *, where: tuple[Path, str], quote: bool = True) -> str:
    """Render one command; a missing variable is a ConfigError naming file, step and variable."""
    import jinja2  # noqa: PLC0415 (see _jinja)

    path, step = where
    try:
        return _env(quote).from_string(template).render(**variables)
    except jinja2.UndefinedError as err:
        raise ConfigError(path, f"step '{step}' uses an undefined variable: {err.message}.",
                          "Pass the variable or give it a default under `vars:`.",
                          field=step) from None
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(path, f"step '{step}' has a template error: {err.message}.",
                          "Fix the {{ ... }} / {% ... %} syntax.", field=step) from None


def evaluate_when(expr: str, variables: dict, where: tuple[Path, str]) -> bool:
    import jinja2  # noqa: PLC0415 (see _jinja)

    path, step = where
    try:
        return bool(_env(False).compile_expression(expr)(**variables))
    except jinja2.UndefinedError as err:
        raise ConfigError(path, f"step '{step}' `when:` uses an undefined variable: {err.message}.",
                          "Pass the variable or give it a default under `vars:`.",
                          field=step) from None
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(path, f"step '{step}' has an invalid `when:` expression: {err.message}.",
                          field=step) from None


def playbook_variables(book: Playbook, variables: dict) -> dict:
    """Defaults from `vars:` (string defaults are templates over the caller's values), then the
    caller's values; `run_id` is a fresh token per run for temporary names."""
    merged = {"run_id": secrets.token_hex(4), **variables}
    for key, default in book.vars.items():
        if key not in variables:
            merged[key] = (render(default, merged, where=(book.path, f"vars.{key}"), quote=False)
                           if isinstance(default, str) else default)
    return merged


# ---- running ---------------------------------------------------------------------------------

def run_playbook(name_or_path: str | Path, variables: dict, executor: Executor,
                 log: Callable[[str], None] = lambda _m: None, *, dry_run: bool = False,
                 base: Path | None = None) -> list[StepResult]:
    """Run each step whose check fails (or that has none). Checks must not change anything: a
    dry run executes them to report what would run. A failing step raises StepFailed after the
    playbook's `on_failure` cleanup has run."""
    book = load_playbook(name_or_path, base)
    values = playbook_variables(book, variables)
    if book.check:
        skipped = _whole_playbook_done(book, values, executor, log)
        if skipped:
            return skipped
    results: list[StepResult] = []
    try:
        for step in book.steps:
            results.append(_run_step(book, step, values, executor, log, dry_run))
    except BaseException:
        if not dry_run:
            _cleanup(book, values, executor, log)
        raise
    return results


def _whole_playbook_done(book, values, executor, log) -> list[StepResult] | None:
    check = render(book.check, values, where=(book.path, "check"))
    if executor.sh(check).code != 0:
        return None
    log(f"{book.name}: already provisioned ({_one_line(check)} succeeded)")
    reason = f"playbook check passed: {_one_line(check)}"
    return [StepResult(s.name, "skipped", reason) for s in book.steps]


def _run_step(book, step, values, executor, log, dry_run) -> StepResult:
    where = (book.path, step.name)
    if step.when is not None and not evaluate_when(step.when, values, where):
        return StepResult(step.name, "not-applicable", f"when: {step.when} is false")
    command = render(step.run, values, where=where)
    if step.check:
        check = render(step.check, values, where=where)
        if executor.sh(check, timeout=step.timeout).code == 0:
            log(f"{book.name}: skip '{step.name}' (check passed: {_one_line(check)})")
            return StepResult(step.name, "skipped", f"check passed: {_one_line(check)}", command)
    if dry_run:
        log(f"{book.name}: would run '{step.name}'")
        return StepResult(step.name, "would-run", "check failed" if step.check else "no check",
                          command)
    log(f"{book.name}: {step.name}")
    result = executor.sh(command, timeout=step.timeout)
    if result.code != 0:
        raise StepFailed(book, step, command, result)
    return StepResult(step.name, "ran", "", command, result)


def _cleanup(book, values, executor, log) -> None:
    if not book.on_failure:
        return
    try:
        command = render(book.on_failure, values, where=(book.path, "on_failure"))
        result = executor.sh(command, timeout=120)
        if result.code != 0:
            log(f"{book.name}: cleanup after failure exited {result.code}: {result.output.strip()}")
    except Exception as err:  # never mask the step's own error
        log(f"{book.name}: cleanup after failure failed: {err}")
