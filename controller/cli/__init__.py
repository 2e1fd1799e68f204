"""The `cube` command: thin parsing and rendering over library functions.

Each concern registers its commands from its own module (model.py, local.py, remote.py, hosts.py,
records.py, schedule.py, lab.py, serve.py, ui.py, sweeps.py), so no file here grows into a 2,000-line main.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from controller import __version__
from controller.errors import CubeError

try:  # typer >= 0.2x parses with its own copy of click, whose usage errors are separate types
    from typer._click.exceptions import ClickException as _VendoredClickException
    USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException, _VendoredClickException)
except ImportError:
    USAGE_ERRORS = (click.ClickException,)

app = typer.Typer(
    name="cube",
    help="Run ML projects (cubes) here or on your own machines over SSH.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cube {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    if debug:
        os.environ["CUBE_DEBUG"] = "1"


def _register() -> None:
    # Imported for their side effect: each adds its commands to `app`.
    # Imported here, not at the top: `cube run`'s fast path never needs them.
    from controller.cli import (  # noqa: F401, PLC0415
        hosts,  # noqa: F401
        lab,
        local,
        model,
        records,
        remote,
        schedule,
        serve,
        sweeps,
        ui,  # noqa: F401,PLC0415
    )


def main() -> None:
    try:
        if sys.argv[1:2] == ["run"] and "--help" not in sys.argv and "-h" not in sys.argv:
            # Fast path: a warm local run skips typer and the other command modules.
            from controller.cli.local import main_run  # noqa: PLC0415 (skips the rest)

            main_run(sys.argv[2:])
            sys.exit(0)
        _register()
        rv = app(standalone_mode=False)
        # In non-standalone mode click returns typer.Exit's code instead of exiting.
        sys.exit(rv if isinstance(rv, int) else 0)
    except CubeError as err:
        if os.environ.get("CUBE_DEBUG"):
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except USAGE_ERRORS as err:  # click usage errors arrive here in non-standalone mode
        err.show()  # type: ignore[attr-defined]  # both types have it
        sys.exit(err.exit_code)  # type: ignore[attr-defined]
