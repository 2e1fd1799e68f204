"""Jobs: the ledger (filtered by host, state, cube and user; sweeps grouped), and one job's page
with its live part (state, outputs, chart) and the cancel, fetch and rerun buttons."""

from __future__ import annotations

import shlex
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from controller import remote
from controller.errors import CubeError
from controller.jobs import FINAL_STATES, Job
from controller.ui import outputs
from controller.ui.pages.common import checked_form, get_job, list_jobs, render, ui

router = APIRouter()
FILTERS = ("host", "state", "cube", "user")
CANCEL_GRACE_S = 5.0
DONE = {"cancel": "Cancel sent.", "fetch": "Outputs fetched into the local workspace."}


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    every = list_jobs()
    chosen = {k: request.query_params.get(k, "") for k in FILTERS}
    shown = [j for j in every if all(not v or str(getattr(j, k)) == v for k, v in chosen.items())]
    options = {k: sorted({str(getattr(j, k)) for j in every}) for k in FILTERS}
    singles, sweeps = _group_sweeps(shown)
    return render(request, "jobs.html", jobs=singles, sweeps=sweeps, chosen=chosen,
                  options=options, total=len(every))


def _group_sweeps(jobs: list[Job]) -> tuple[list[Job], dict[str, list[Job]]]:
    """Jobs that carry a sweep id (a `sweep` field, when the ledger has one) are grouped."""
    sweeps: dict[str, list[Job]] = {}
    singles = []
    for job in jobs:
        sweep = getattr(job, "sweep", None)
        if sweep:
            sweeps.setdefault(str(sweep), []).append(job)
        else:
            singles.append(job)
    return singles, sweeps


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    job = get_job(job_id)
    ui(request).followers.ensure(job)
    return render(request, "job.html", **_job_view(request, job),
                  done=DONE.get(request.query_params.get("done", ""), ""), error=None)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, job_id: str) -> HTMLResponse:
    """The part of the job page that changes when the job ends (state, outputs, chart)."""
    return render(request, "_job_live.html", **_job_view(request, get_job(job_id)))


def _job_view(request: Request, job: Job) -> dict:
    follow = ui(request).followers.get(job.id)
    return {"job": job, "final": job.state in FINAL_STATES, "entries": outputs.top_level(job),
            "metrics": outputs.metrics(job), "has_model": outputs.model_dir(job) is not None,
            "follow": follow, "shell": _shell_lines(job)}


def _shell_lines(job: Job) -> dict:
    """MOO's "login the environment": cube's command and the plain ssh line it runs."""
    try:
        ssh = shlex.join(remote.shell_argv(job.id))
    except CubeError as err:
        ssh = f"(unavailable: {err.message})"
    return {"cube": f"cube remote shell {job.id}", "ssh": ssh}


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    await checked_form(request)
    job = get_job(job_id)
    return await _action(request, job, "cancel",
                         lambda: remote.cancel(job.id, CANCEL_GRACE_S, lambda _m: None))


@router.post("/jobs/{job_id}/fetch")
async def fetch(request: Request, job_id: str) -> Response:
    await checked_form(request)
    job = get_job(job_id)
    return await _action(request, job, "fetch", lambda: remote.fetch(job.id, lambda _m: None))


@router.post("/jobs/{job_id}/rerun")
async def rerun(request: Request, job_id: str) -> Response:
    """The same cube folder, tasks, parameters, runtime and host, as a new job."""
    await checked_form(request)
    job = get_job(job_id)
    if any(v == "***" for v in job.params.values()):
        raise CubeError(f"Job {job.id} had secret parameters, which the ledger does not keep.",
                        "Submit it again from the Submit page with its values.")
    req = remote.RunRequest(cube_path=Path(job.cube_path), host=job.host,
                            tasks=",".join(job.tasks), overrides=dict(job.params),
                            workspace=Path(job.workspace) if job.workspace else None,
                            runtime=job.runtime or None,
                            inventory=Path(job.inventory) if job.inventory else None,
                            detach=True)
    sub = ui(request).submissions.start(req)
    return RedirectResponse(f"/submissions/{sub.id}", status_code=303)


async def _action(request: Request, job: Job, what: str, call) -> Response:
    """Run a library call off the event loop; an error is shown on the job page."""
    try:
        await run_in_threadpool(call)
    except CubeError as err:
        job = get_job(job.id)
        return render(request, "job.html", status=502, **_job_view(request, job), done="",
                      error=f"{what} failed: {err}")
    ui(request).followers.ensure(get_job(job.id))
    return RedirectResponse(f"/jobs/{job.id}?done={what}", status_code=303)
