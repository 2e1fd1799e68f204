"""A job's outputs: browse a folder, download a file, or a folder as a ZIP. Paths are checked by
controller.ui.outputs (declared outputs only, never outside the job's workspace)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse

from controller.ui import outputs
from controller.ui.pages.common import get_job, render

router = APIRouter()


@router.get("/jobs/{job_id}/files/{rel:path}")
def browse(request: Request, job_id: str, rel: str) -> Response:
    job = get_job(job_id)
    target = outputs.resolve(job, rel)
    if target.is_file():
        return FileResponse(target, filename=target.name)
    parent = str(PurePosixPath(rel.strip("/")).parent)
    return render(request, "files.html", job=job, rel=rel.strip("/"),
                  entries=outputs.listing(job, rel),
                  parent=None if parent == "." else parent)


@router.get("/jobs/{job_id}/zip/{rel:path}")
def download_zip(job_id: str, rel: str) -> Response:
    job = get_job(job_id)
    data = outputs.zip_folder(job, rel)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", PurePosixPath(rel.strip("/")).name) or "outputs"

    def chunks():
        with data:
            while block := data.read(1024 * 1024):
                yield block

    return StreamingResponse(chunks(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{job.id}-{name}.zip"'})


@router.get("/jobs/{job_id}/files", response_class=HTMLResponse)
def browse_top(request: Request, job_id: str) -> HTMLResponse:
    job = get_job(job_id)
    return render(request, "files.html", job=job, rel="", entries=outputs.top_level(job),
                  parent=None)
