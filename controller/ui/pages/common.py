"""Helpers every page module uses: render a template, reach the shared context, read a form
post with its CSRF token checked, look a job up in the ledger."""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import FormData

from controller.errors import CubeError
from controller.jobs import Job, Ledger
from controller.ui import auth
from controller.ui.context import UiContext

MAX_FORM_PART = 64 * 1024 * 1024  # one uploaded file (the ZIP upload's own limit)


class NotFound(CubeError):
    status = 404


def ui(request: Request) -> UiContext:
    return request.app.state.ui


def render(request: Request, name: str, status: int = 200, **values) -> HTMLResponse:
    context = ui(request)
    html = context.templates.get_template(name).render(
        request=request, csrf=context.csrf, path=request.url.path, **values)
    return HTMLResponse(html, status_code=status)


async def checked_form(request: Request) -> FormData:
    """The posted form, after its CSRF field (or X-CSRF-Token header) matched: a page of
    another site cannot know it, so it cannot post here in the user's name."""
    try:
        form = await request.form(max_files=2, max_fields=50, max_part_size=MAX_FORM_PART)
    except Exception as err:  # parser errors (too large, malformed) have no common base
        raise HTTPException(400, f"The form cannot be read: {err}") from err
    check_csrf(request, form.get(auth.CSRF_FIELD))
    return form


def check_csrf(request: Request, given: object = None) -> None:
    token = given if isinstance(given, str) else request.headers.get(auth.CSRF_HEADER)
    if not auth.same(token, ui(request).csrf):
        raise HTTPException(403, "The form's CSRF token is missing or stale: reload the page "
                                 "and submit again.")


def get_job(job_id: str) -> Job:
    with Ledger() as ledger:
        try:
            return ledger.get(job_id)
        except CubeError as err:
            raise NotFound(err.message, err.hint) from err


def list_jobs(limit: int = 1000) -> list[Job]:
    with Ledger() as ledger:
        return ledger.list(limit=limit)
