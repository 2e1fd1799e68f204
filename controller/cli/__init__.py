"""The `cube` command: thin parsing and rendering over library functions.

Each concern registers its commands from its own module (model.py, local.py, remote.py, hosts.py,
records.py, schedule.py, lab.py, serve.py, ui.py, sweeps.py), so no file here grows into a 2,000-line main.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from controller import __version__
from controller.errors import CubeError

try:  # typer >= 0.2x parses with its own copy of click (click itself may not be installed)
    from typer._click.exceptions import ClickException as UsageError
except ImportError:  # older typer runs on click
    from click import ClickException as UsageError  # type: ignore[assignment]
USAGE_ERRORS: tuple[type[Exception], ...] = (UsageError,)

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


# Which command modules a first word needs: importing all of them (paramiko, rich, the web
# stack's helpers) costs a quarter of a second that `cube remote run` would pay on every call.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "remote": ("remote", "records", "sweeps"), "show": ("records",), "diff": ("records",),
    "rerun": ("records",), "sweep": ("sweeps",), "hosts": ("hosts",), "lab": ("lab",),
    "schedule": ("schedule",), "serve": ("serve",), "ui": ("ui",), "run": ("local",),
    "describe": ("model",), "validate": ("model",),
}
ALL_MODULES = tuple(sorted({m for mods in COMMAND_MODULES.values() for m in mods}))


def _register(command: str | None = None) -> None:
    """Import the command modules (each adds its commands to `app`): those the first word
    needs, or all of them for `cube --help` and anything unknown."""
    for module in COMMAND_MODULES.get(command or "", ALL_MODULES):
        importlib.import_module(f"controller.cli.{module}")


def main() -> None:
    try:
        if sys.argv[1:2] == ["run"] and "--help" not in sys.argv and "-h" not in sys.argv:
            # Fast path: a warm local run skips typer and the other command modules.
            from controller.cli.local import main_run  # noqa: PLC0415 (skips the rest)

            main_run(sys.argv[2:])
            sys.exit(0)
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command or "--version" not in sys.argv:   # --version needs no command module
            _register(command)
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
