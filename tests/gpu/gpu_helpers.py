"""Helpers of the CUDA tests."""

from __future__ import annotations

import contextlib

from tokenflow_cli.tokenizer.inference import matmul_precision


def no_tf32() -> contextlib.AbstractContextManager[None]:
    """True fp32 on CUDA: PyTorch lets cuDNN convolutions use TF32 by default."""
    return matmul_precision(False)
