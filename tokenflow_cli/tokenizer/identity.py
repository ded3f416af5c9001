"""Which tokenizer made a codes file, and whether a tokenizer can decode it: the identity every
codes file records (name, source, sha256 of the weights file) and the checks against it."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenflow_cli.errors import UserError
from tokenflow_cli.fileio import file_sha256
from tokenflow_cli.tokenizer.model import TokenFlowTokenizer
from tokenflow_cli.tokenizer.resolve import resolve_tokenizer


class CodesTokenizerMismatch(UserError, ValueError):
    """Codes and a tokenizer that did not make them."""


def tokenizer_id(tok: TokenFlowTokenizer) -> dict:
    """{"tokenizer": name, "tokenizer_source", "random_init", "tokenizer_sha256" (a file's)}."""
    info = {"tokenizer": tok.config.name, "tokenizer_source": tok.source, "random_init": tok.random_init}
    if not tok.random_init and Path(tok.source).is_file():
        info["tokenizer_sha256"] = file_sha256(tok.source)
    return info


def codes_meta(tok: TokenFlowTokenizer, failures: list[tuple[str, str]]) -> dict:
    """The metadata every codes file written by tokenize carries (docs/CODES.md)."""
    return {"codebook_size": tok.codebook_size, "resolution": tok.image_size, "code_dim": tok.code_dim,
            "failed": len(failures), **tokenizer_id(tok)}


def resolve_tokenizer_for_codes(meta: dict, model: str | None, device: torch.device | str,
                                codes_path: str | Path) -> TokenFlowTokenizer:
    """The tokenizer that made a codes file: `model` when given, else the checkpoint its metadata
    names (`tokenizer_source`); either way checked against the codes (`check_codes_tokenizer`)."""
    if model:
        tok = resolve_tokenizer(model, device)
    elif meta.get("random_init"):  # only the same seeded stand-in decodes them
        tok = resolve_tokenizer(None, device)
        if not tok.random_init or tok.source != meta.get("tokenizer_source"):
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by a random-init tokenizer ({meta.get('tokenizer_source')}); "
                f"the default is now {tok.source}: pass --model to decode them anyway")
    else:
        source = meta.get("tokenizer_source", "")
        if not source or not Path(source).is_file():
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by the tokenizer {source or '(not recorded)'}, which is not there now; "
                "pass --model with that checkpoint")
        tok = resolve_tokenizer(source, device)
    check_codes_tokenizer(meta, tok, codes_path)
    return tok


def check_codes_tokenizer(meta: dict, tok: TokenFlowTokenizer, codes_path: str | Path,
                          scales: tuple[int, ...] | None = None) -> None:
    """Refuse a tokenizer whose weights (sha256), codebook size or scales differ from the one
    that made the codes; the error names both."""
    if scales is not None and tuple(scales) != tok.scales:
        raise CodesTokenizerMismatch(f"{codes_path} has scales {tuple(scales)}; the tokenizer {tok.source} "
                                     f"has {tok.scales}")
    if meta.get("codebook_size", tok.codebook_size) != tok.codebook_size:
        raise CodesTokenizerMismatch(f"{codes_path} has codebook size {meta['codebook_size']}; the tokenizer "
                                     f"{tok.source} has {tok.codebook_size}")
    expected = meta.get("tokenizer_sha256")
    if expected and not tok.random_init and Path(tok.source).is_file():
        actual = file_sha256(tok.source)
        if actual != expected:
            raise CodesTokenizerMismatch(
                f"{codes_path} was made by {meta.get('tokenizer_source')} (sha256 {expected[:12]}); "
                f"{tok.source} is a different tokenizer (sha256 {actual[:12]})")
