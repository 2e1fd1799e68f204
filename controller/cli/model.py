"""`cube` commands: model (placeholder until its module lands)."""

from controller.cli import app  # noqa: F401
