"""`cube serve MODEL_DIR`: online inference over HTTP for a trained MNIST model.

Heavy imports (TensorFlow, FastAPI) happen inside the command, so `cube --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from controller.cli import app


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(..., help="Folder the train task wrote (holds model.keras)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to bind; anything but loopback needs a token."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CUBE_SERVE_TOKEN",
                                        help="Token every request must carry (default off "
                                             "loopback: a generated one, printed once)."),
) -> None:
    """Serve MODEL_DIR/model.keras: POST /predict (image upload or 28x28 pixels), GET /health."""
    import uvicorn  # noqa: PLC0415  (heavy imports only when serving)

    from controller.serve import create_app  # noqa: PLC0415
    from controller.ui import auth  # noqa: PLC0415

    url = f"http://{host}:{port}"
    # Web endpoints off loopback need a token (same rule and guard as `cube ui`).
    token = auth.bind_token(host, token, lambda m: typer.echo(f"cube: {m}", err=True), url)
    app = auth.TokenGuard(create_app(model_dir), token)
    typer.echo(f"cube: serving {model_dir / 'model.keras'} on {url} "
               "(POST /predict, GET /health)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
