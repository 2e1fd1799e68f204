"""The Submit form, checked before anything runs, with the CLI's own checks in the CLI's order:
load_cube (cube, then runtime), split_tasks, parse_param_overrides, plan_job and its inputs,
select_hosts. Each CubeError/ConfigError's text lands beside the field it concerns; the first
error of a field stops the checks that depend on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from controller.cube import Cube, load_cube
from controller.errors import CubeError
from controller.plan import plan_job
from controller.remote import RunRequest
from controller.selectors import select_hosts
from controller.taskargs import parse_param_overrides, split_tasks
from controller.ui import sources

SOURCES = ("folder", "zip", "git")


@dataclass
class SubmitForm:
    source: str = "folder"
    cube: str = ""             # a name from the folder of cubes
    staged: str = ""           # an earlier upload or clone
    git_url: str = ""
    git_subdir: str = ""
    git_ref: str = ""
    tasks: str = ""
    host: str = ""
    runtime: str = ""
    params: str = ""           # NAME=PATH, one a line
    errors: dict[str, str] = field(default_factory=dict)
    status: int = 422          # the HTTP status of a refused form (a refused ZIP brings its own)

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> SubmitForm:
        form = cls()
        for name in cls.__dataclass_fields__:
            if name not in ("errors", "status") and name in data:
                setattr(form, name, str(data[name]).strip())
        return form

    def fail(self, field_name: str, err: CubeError) -> None:
        self.errors.setdefault(field_name, str(err))
        self.status = getattr(err, "status", self.status)


def validate(form: SubmitForm, cubes_dir: Path | None, upload: BinaryIO | None,
             upload_name: str, pick_host) -> RunRequest | None:
    """A RunRequest, or None with `form.errors` filled in. `pick_host(names)` chooses one host
    of a group."""
    path = _cube_path(form, cubes_dir, upload, upload_name)
    cube = _load(form, path) if path else None
    host = _host(form, pick_host)
    if cube is None:
        return None
    overrides = _overrides(form)
    try:
        tasks = split_tasks(form.tasks, cube)
    except CubeError as err:
        form.fail("tasks", err)
        return None
    if overrides is not None:
        try:
            plan_job(cube, tasks, overrides).inputs_to_push()
        except CubeError as err:
            form.fail("params", err)
    if form.errors or host is None or overrides is None or path is None:
        return None
    return RunRequest(cube_path=path, host=host, tasks=",".join(tasks), overrides=overrides,
                      runtime=form.runtime or None, detach=True)


def _cube_path(form: SubmitForm, cubes_dir: Path | None, upload: BinaryIO | None,
               upload_name: str) -> Path | None:
    field_name = {"folder": "cube", "zip": "zip", "git": "git_url"}.get(form.source, "source")
    try:
        if form.source == "folder":
            return sources.from_folder(cubes_dir, form.cube)
        if form.source == "zip" and upload is None and form.staged:
            return sources.staged_cube(form.staged)
        if form.source == "zip":
            if upload is None:
                raise CubeError("Choose a ZIP file of the cube to upload.")
            form.staged, path = sources.from_zip(upload, upload_name)
            return path
        if form.source == "git":
            if form.staged:
                return sources.staged_cube(form.staged)
            form.staged, path = sources.from_git(form.git_url, form.git_subdir, form.git_ref)
            return path
        raise CubeError(f"Unknown cube source '{form.source}'.", "Choose folder, zip or git.")
    except CubeError as err:
        form.fail(field_name, err)
        return None


def _load(form: SubmitForm, path: Path) -> Cube | None:
    """Twice when a runtime is chosen: an error without it is the cube's, with it the
    runtime's (then the cube as loaded without it still serves the other fields' checks)."""
    where = {"folder": "cube", "zip": "zip", "git": "git_url"}[form.source]
    try:
        cube = load_cube(path)
    except CubeError as err:
        form.fail(where, err)
        return None
    if not form.runtime:
        return cube
    try:
        return load_cube(path, requested_runtime=form.runtime)
    except CubeError as err:
        form.fail("runtime", err)
        return cube


def _overrides(form: SubmitForm) -> dict[str, str] | None:
    try:
        return parse_param_overrides(line.strip() for line in form.params.splitlines()
                                     if line.strip())
    except CubeError as err:
        form.fail("params", err)
        return None


def _host(form: SubmitForm, pick_host) -> str | None:
    if not form.host:
        form.fail("host", CubeError("Choose a host or a group (@name).", None))
        return None
    try:
        specs = select_hosts(form.host)
    except CubeError as err:
        form.fail("host", err)
        return None
    return pick_host([s.name for s in specs])
