"""Submit: a cube from the folder of cubes, an uploaded ZIP or a git URL, with tasks, a host or
@group, a runtime and parameter overrides. Checked with the CLI's own checks
(controller.ui.validate) before anything runs; then `remote.run` runs detached in a background
thread (controller.ui.submissions) and the submission page follows it to the job page."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile

from controller.runtimes import RUNTIMES
from controller.ui import sources, zipcheck
from controller.ui.pages.common import NotFound, checked_form, render, ui
from controller.ui.validate import SubmitForm, validate

router = APIRouter()


def _page(request: Request, form: SubmitForm, status: int = 200) -> HTMLResponse:
    settings = ui(request).settings
    return render(request, "submit.html", status=status, form=form,
                  cubes=sources.list_cubes(settings.cubes_dir), cubes_dir=settings.cubes_dir,
                  runtimes=list(RUNTIMES), max_zip=zipcheck.MAX_UPLOAD_BYTES)


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request) -> HTMLResponse:
    fields = {k: v for k, v in request.query_params.items() if k != "errors"}
    return _page(request, SubmitForm.from_fields(fields))


@router.post("/submit")
async def submit(request: Request) -> Response:
    data = await checked_form(request)
    form = SubmitForm.from_fields({k: v for k, v in data.items() if isinstance(v, str)})
    upload = data.get("zip")
    file = upload if isinstance(upload, UploadFile) and upload.filename else None
    if file is not None and (file.size or 0) > zipcheck.MAX_UPLOAD_BYTES:
        form.errors["zip"] = (f"The ZIP is {file.size:,} bytes; the limit is "
                              f"{zipcheck.MAX_UPLOAD_BYTES:,} bytes.")
        return _page(request, form, status=413)
    context = ui(request)
    req = await run_in_threadpool(validate, form, context.settings.cubes_dir,
                                  file.file if file else None,
                                  (file.filename or "") if file else "", context.fleet.best_of)
    if req is None:
        return _page(request, form, status=form.status)
    sub = context.submissions.start(req)
    return RedirectResponse(f"/submissions/{sub.id}", status_code=303)


@router.get("/submissions/{sub_id}", response_class=HTMLResponse)
def submission_page(request: Request, sub_id: str) -> HTMLResponse:
    sub = ui(request).submissions.get(sub_id)
    if sub is None:
        raise NotFound(f"No submission '{sub_id}' in this server.",
                       "Submissions are kept while `cube ui` runs; see the Jobs page.")
    return render(request, "submission.html", sub=sub)


@router.get("/submissions/{sub_id}/state")
def submission_json(request: Request, sub_id: str) -> JSONResponse:
    sub = ui(request).submissions.get(sub_id)
    if sub is None:
        return JSONResponse({"detail": f"No submission '{sub_id}'."}, status_code=404)
    return JSONResponse(sub.to_dict())
