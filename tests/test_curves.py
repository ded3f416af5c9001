"""Learning curves as PNG (RUN_DIR/curves.png, written at the end of every training run)."""

import json

import numpy as np
from PIL import Image

from tokenflow_cli.eval.visual import learning_curves


def test_learning_curves_draw_one_panel_per_logged_quantity(tmp_path):
    rows = [{"split": "train", "step": s, "loss": 5.0 / s, "nll": 4.0 / s} for s in range(1, 30)]
    rows += [{"split": "eval", "step": s, "psnr": 20.0 + s / 10} for s in (10, 20, 29)]
    rows += [{"split": "eval", "step": 29, "val_accuracy": 0.5}]  # one point: no panel
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = learning_curves(metrics, tmp_path / "curves.png", width=300, height=100)
    with Image.open(out) as img:
        assert img.size == (300, 300)  # train loss, train nll, eval psnr
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 2  # something drawn
    metrics.write_text(json.dumps({"split": "train", "step": 1, "loss": 1.0}) + "\n")
    assert learning_curves(metrics, tmp_path / "none.png") is None
