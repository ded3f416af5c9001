"""tokenflow-cli: a toolkit for TokenFlow-style unified image tokenizers."""

__version__ = "0.1.0"
