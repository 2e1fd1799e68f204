"""The `cube ui` application: FastAPI routes (controller/ui/pages/), Jinja2 templates and static
files served from this package, wrapped in the token guard (controller/ui/auth.py).

This module imports FastAPI at its top: it is only imported by the `cube ui` command, never by
`cube --help`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from controller.errors import CubeError, HostUnreachable
from controller.ui import auth
from controller.ui.context import HERE, UiContext, UiSettings
from controller.ui.pages import files, hosts, jobs, logs, submit, trymodel
from controller.ui.pages.common import render


def create_app(settings: UiSettings):
    """The ASGI app: FastAPI inside the token guard."""
    app = FastAPI(title="cube ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = UiContext(settings)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (hosts, jobs, logs, files, submit, trymodel):
        app.include_router(module.router)

    @app.get("/")
    def home() -> Response:
        return RedirectResponse("/jobs", status_code=303)

    @app.exception_handler(CubeError)
    async def cube_error(request: Request, err: CubeError) -> HTMLResponse:
        status = getattr(err, "status", 502 if isinstance(err, HostUnreachable) else 400)
        return render(request, "error.html", status=status, error=err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        """A page for a browser, JSON for scripts (the Try page's fetch)."""
        if "text/html" in request.headers.get("accept", ""):
            return render(request, "error.html", status=err.status_code,
                          error=CubeError(str(err.detail)))
        return JSONResponse({"detail": err.detail}, status_code=err.status_code)

    return auth.TokenGuard(app, settings.token)


def serve_ui(settings: UiSettings, announce) -> None:
    """Run the server until interrupted; a non-loopback bind gets a token (printed once)."""
    import uvicorn  # noqa: PLC0415  (only a running server needs it)

    url = f"http://{settings.bind}:{settings.port}"
    settings.token = auth.bind_token(settings.bind, settings.token, announce, url)
    announce(f"web page on {url}/" + ("" if settings.token else " (loopback only)"))
    uvicorn.run(create_app(settings), host=settings.bind, port=settings.port,
                log_level="warning")
