"""tokenflow-cli: a toolkit for TokenFlow-style unified image tokenizers (CVPR 2025).

The public Python API (README "Python API"); every name loads on first use (PEP 562), so
`import tokenflow_cli` stays light and never imports torch:

    import tokenflow_cli as tf

    tok = tf.TokenFlowTokenizer.from_pretrained()        # the default tokenizer
    codes = tok.encode(images)                           # -> tf.MultiScaleCodes
    pipe = tf.TextToImage.from_pretrained()              # text -> images
    vlm = tf.Understanding.from_pretrained()             # image + question -> answer
"""

from tokenflow_cli.version import __version__

__all__ = [
    "__version__",
    "MultiScaleCodes",
    "TextToImage",
    "TextToImageOutput",
    "TokenFlowTokenizer",
    "Understanding",
    "read_codes",
    "train_generator",
    "train_tokenizer",
]


def __getattr__(name: str):
    """The public names, imported when first asked for."""
    if name in ("TokenFlowTokenizer", "MultiScaleCodes"):
        from tokenflow_cli.tokenizer import model as module
    elif name in ("TextToImage", "TextToImageOutput"):
        from tokenflow_cli.generation import text_to_image as module
    elif name == "Understanding":
        from tokenflow_cli.understanding import pipeline as module
    elif name == "read_codes":
        from tokenflow_cli.tokenizer import codes as module
    elif name == "train_tokenizer":
        from tokenflow_cli.tokenizer import stage as module
    elif name == "train_generator":
        from tokenflow_cli.generation import stage as module
    else:
        raise AttributeError(f"module 'tokenflow_cli' has no attribute {name!r}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(__all__)
