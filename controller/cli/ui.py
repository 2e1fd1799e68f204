"""`cube ui`: the web page (controller/ui/): hosts, jobs, submit, live logs, outputs, try.

FastAPI, uvicorn and Jinja2's templates load inside the command, so `cube --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from controller.cli import app


@app.command("ui")
def ui_cmd(
    bind: str = typer.Option("127.0.0.1", "--bind",
                             help="Address to listen on; anything but loopback needs a token."),
    port: int = typer.Option(8080, "--port", "-p", help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CUBE_UI_TOKEN",
                                        help="Token every request must carry (default off "
                                             "loopback: a generated one, printed once)."),
    cubes: Optional[Path] = typer.Option(None, "--cubes",
                                         help="Folder of cubes the Submit page offers "
                                              "(default: ./cubes when it exists)."),
) -> None:
    """A web page to see hosts and jobs, submit cubes, watch logs, fetch outputs, try models."""
    from controller.ui.app import serve_ui  # noqa: PLC0415  (FastAPI only when serving)
    from controller.ui.context import UiSettings  # noqa: PLC0415

    if cubes is None and Path("cubes").is_dir():
        cubes = Path("cubes")
    settings = UiSettings(bind=bind, port=port, token=token,
                          cubes_dir=cubes.resolve() if cubes else None)
    serve_ui(settings, lambda message: typer.echo(f"cube: {message}", err=True))
