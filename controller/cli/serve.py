"""`cube serve MODEL_DIR`: online inference over HTTP for a trained MNIST model.

Heavy imports (TensorFlow, FastAPI) happen inside the command, so `cube --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from controller.cli import app


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(..., help="Folder the train task wrote (holds model.keras)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to bind; 0.0.0.0 exposes it to the network."),
) -> None:
    """Serve MODEL_DIR/model.keras: POST /predict (image upload or 28x28 pixels), GET /health."""
    from controller.serve import serve as run_server

    typer.echo(f"cube: serving {model_dir / 'model.keras'} on http://{host}:{port} "
               "(POST /predict, GET /health)", err=True)
    run_server(model_dir, host=host, port=port)
