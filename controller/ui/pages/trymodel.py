"""Try: a job whose outputs hold a Keras model answers an uploaded image or a digit drawn on a
canvas with the digit and its ten probabilities. The model loading, image steps and prediction
are `cube serve`'s own (controller.serve), so both pages answer alike."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from controller import serve
from controller.errors import CubeError
from controller.ui import outputs
from controller.ui.pages.common import NotFound, check_csrf, get_job, render

router = APIRouter()
_models: dict[tuple[str, int], object] = {}   # (model file, mtime_ns) -> loaded model
_lock = threading.Lock()


def _model_dir(job_id: str) -> Path:
    job = get_job(job_id)
    found = outputs.model_dir(job)
    if found is None:
        raise NotFound(f"Job {job.id} has no Keras model ({serve.MODEL_FILE}) among its "
                       "outputs here.", "Fetch its outputs first, or try a job of a train task.")
    return found


def _model(model_dir: Path):
    """Loaded once per file version: a re-trained model is picked up, an unchanged one is not
    loaded again (TensorFlow takes seconds)."""
    path = model_dir / serve.MODEL_FILE
    key = (str(path), path.stat().st_mtime_ns)
    with _lock:
        if key not in _models:
            _models[key] = serve.load_model(model_dir)
        return _models[key]


@router.get("/jobs/{job_id}/try", response_class=HTMLResponse)
def try_page(request: Request, job_id: str) -> HTMLResponse:
    model_dir = _model_dir(job_id)
    return render(request, "try.html", job=get_job(job_id),
                  model=str(model_dir / serve.MODEL_FILE))


@router.post("/jobs/{job_id}/try")
async def try_predict(request: Request, job_id: str) -> JSONResponse:
    """multipart `file` (PNG/JPEG) or JSON {"pixels": 28x28}, as `cube serve`'s /predict."""
    check_csrf(request)
    model_dir = _model_dir(job_id)
    try:
        pixels = await serve.read_pixels(request)
        model = await run_in_threadpool(_model, model_dir)
        answer = await run_in_threadpool(serve.predict, model, pixels)
    except serve.BadInput as err:
        return JSONResponse({"detail": str(err)}, status_code=err.status)
    except CubeError as err:
        return JSONResponse({"detail": str(err)}, status_code=422)
    return JSONResponse({**answer, "pixels": pixels.tolist()})
