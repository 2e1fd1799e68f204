"""A job's log as server-sent events, read from the local log file that the job's follower
(controller.ui.followers: `remote.attach`) appends to. Each event's id is the byte offset after
it, so a reconnecting EventSource (Last-Event-ID) resumes without a lost or doubled byte. The
stream ends with an `end` event once the job is final and its follower is done."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from controller.jobs import Job
from controller.ui.followers import Followers
from controller.ui.pages.common import get_job, ui

router = APIRouter()
POLL_S = 0.25
STATE_EVERY_S = 1.0
KEEPALIVE_S = 15.0
CHUNK = 64 * 1024


@router.get("/jobs/{job_id}/log")
async def log_events(request: Request, job_id: str) -> StreamingResponse:
    job = get_job(job_id)
    followers = ui(request).followers
    followers.ensure(job)
    start = request.headers.get("last-event-id", "0")
    offset = int(start) if start.isdigit() else 0
    return StreamingResponse(_events(request, job, followers, offset),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/jobs/{job_id}/log.txt")
def log_file(job_id: str) -> Response:
    path = Path(get_job(job_id).log_path)
    if not path.is_file():
        return Response("(no log yet)\n", media_type="text/plain")
    return FileResponse(path, media_type="text/plain", filename=f"{job_id}.log")


async def _events(request: Request, job: Job, followers: Followers,
                  offset: int) -> AsyncIterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # chunks may split a character
    path = Path(job.log_path)
    checked = sent = time.monotonic()
    settled = False
    while not await request.is_disconnected():
        data = _read(path, offset)
        if data:
            offset += len(data)
            sent = time.monotonic()
            yield f"id: {offset}\ndata: {json.dumps(decoder.decode(data))}\n\n"
            continue
        if settled:  # final and drained: the last read found nothing more
            yield f"event: end\ndata: {json.dumps({'state': job.state})}\n\n"
            return
        now = time.monotonic()
        if now - checked > STATE_EVERY_S:
            checked, job = now, get_job(job.id)
            settled = job.finished and not followers.active(job.id)
        if now - sent > KEEPALIVE_S:
            sent = now
            yield ": keepalive\n\n"
        await asyncio.sleep(0 if settled else POLL_S)


def _read(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""
