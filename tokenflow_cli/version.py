"""The package version (one place; `tokenflow_cli.__version__` re-exports it)."""

__version__ = "0.1.0"
