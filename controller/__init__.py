"""cube: run ML projects (cubes) locally or on your own machines over SSH."""

__version__ = "0.1.0"
