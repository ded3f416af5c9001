"""The tokenizer stage: gradients reach every trainable parameter, the GAN starts at its step,
exact resume, codebook-health hooks, evaluation, and the `train-tokenizer` command."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from tokenflow_cli.checkpoint import STATE_NAME, load_train_state
from tokenflow_cli.config import load_recipe
from tokenflow_cli.device import seed_everything
from tokenflow_cli.distributed import DistInfo
from tokenflow_cli.tokenizer.config import TokenizerRecipe
from tokenflow_cli.tokenizer.stage import TokenizerStage, split_train_val
from tokenflow_cli.train.loop import train
from tokenflow_cli.train.state import step_dir


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from tokenflow_cli.data.shapes import render_shapes_world

    out = tmp_path_factory.mktemp("shapes")
    render_shapes_world(out, n=12, seed=0, size=64)
    return out / "images"


def recipe_for(shapes_dir, *extra: str):
    base = [
        f"data.train={shapes_dir}", "data.val_limit=4", "train.batch_size=4", "train.steps=3",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=1", "train.warmup_steps=0",
        "model.quantizer.codebook_size=64", "eval.batch_size=4",
    ]
    return load_recipe("tiny", TokenizerRecipe, overrides=[*base, *extra])


def bound_stage(recipe, tmp_path) -> TokenizerStage:
    """A stage wired up by hand as the loop would (single process, CPU)."""
    seed_everything(0)
    stage = TokenizerStage(recipe)
    stage.device, stage.dist, stage.run_dir, stage.cfg = torch.device("cpu"), DistInfo(), tmp_path, recipe.train
    stage.wrapped = stage.modules()
    stage.setup()
    return stage


def first_batch(stage: TokenizerStage) -> dict:
    data = stage.train_data()
    return data.collate_fn([data.dataset[i] for i in range(4)])


GAN_AND_LPIPS = ("train.loss.gan_weight=0.5", "train.loss.gan_start_step=0", "train.loss.gan_adaptive_weight=true",
                 "train.loss.lpips_weight=1", "train.loss.lpips_net=alex", "train.loss.lpips_random_backbone=true",
                 "train.loss.disc_channels=8", "train.loss.disc_layers=2")


def test_every_trainable_parameter_gets_a_gradient_and_losses_stay_apart(shapes_dir, tmp_path):
    stage = bound_stage(recipe_for(shapes_dir, *GAN_AND_LPIPS), tmp_path)
    losses = stage.step(first_batch(stage), step=0)
    assert {"l2", "lpips_random", "codebook", "commit", "semantic", "gan_g", "disc_loss", "loss"} <= set(losses)
    losses["disc_loss"].backward(retain_graph=True)
    disc_only = {n: p.grad.clone() for n, p in stage.discriminator.named_parameters()}
    assert all(p.grad is None for p in stage.model.parameters())  # D's loss never reaches the tokenizer
    losses["loss"].backward()
    for name, module in stage.modules().items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    for pname, p in stage.discriminator.named_parameters():  # G's GAN term never reaches D
        assert torch.equal(p.grad, disc_only[pname]), pname
    assert stage.teacher is not None and not any(p.requires_grad for p in stage.teacher.parameters())


def test_semantic_branch_off_freezes_the_semantic_half(shapes_dir, tmp_path):
    recipe = recipe_for(shapes_dir, "model.quantizer.use_semantic=false", "train.loss.semantic_weight=0",
                        "model.teacher.enabled=false")
    stage = bound_stage(recipe, tmp_path)
    assert stage.teacher is None and "semantic" not in stage.step(first_batch(stage), 0)
    frozen = [n for n, p in stage.model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("semantic_encoder", "semantic_proj", "semantic_decoder", "semantic_head"))
                          for n in frozen)


def test_gan_starts_at_its_step(shapes_dir, tmp_path):
    recipe = recipe_for(shapes_dir, "train.loss.gan_weight=0.5", "train.loss.gan_start_step=2",
                        "train.loss.disc_channels=8", "train.loss.disc_layers=2")
    seed_everything(0)
    stage = TokenizerStage(recipe)
    initial = {k: v.clone() for k, v in stage.discriminator.state_dict().items()}
    result = train(stage, recipe.train, tmp_path, recipe=recipe, device="cpu", live=False)
    assert ["disc_loss" in row for row in result.history] == [False, False, True]
    assert ["gan_g" in row for row in result.history] == [False, False, True]
    at_2 = load_train_state(step_dir(tmp_path, 2) / STATE_NAME)["stage"]["discriminator"]
    at_3 = load_train_state(step_dir(tmp_path, 3) / STATE_NAME)["stage"]["discriminator"]
    assert all(torch.equal(initial[k], at_2[k]) for k in initial)  # untouched before its start
    assert not all(torch.equal(initial[k], at_3[k]) for k in initial)


class CrashingStage(TokenizerStage):
    def step(self, batch, step):
        if step == 1:
            raise RuntimeError("simulated crash")
        return super().step(batch, step)


def test_resume_continues_with_the_same_losses(shapes_dir, tmp_path):
    # dead-code restart and a GAN from step 1 put the stage's own state through the resume too
    recipe = recipe_for(shapes_dir, "train.steps=3", "train.dead_code_restart_steps=1",
                        "train.loss.gan_weight=0.5", "train.loss.gan_start_step=1",
                        "train.loss.disc_channels=8", "train.loss.disc_layers=2")

    def run(stage_cls, folder):
        seed_everything(recipe.train.seed)
        return train(stage_cls(recipe), recipe.train, tmp_path / folder, recipe=recipe, device="cpu", live=False)

    full = run(TokenizerStage, "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(CrashingStage, "cut")
    resumed = run(TokenizerStage, "cut")
    assert [r["step"] for r in resumed.history] == [2, 3]
    for a, b in zip(full.history[1:], resumed.history, strict=True):
        assert {k: v for k, v in a.items() if k not in ("images_per_s", "eta_s")} == \
               {k: v for k, v in b.items() if k not in ("images_per_s", "eta_s")}


def test_dead_code_restart_revives_unused_codes(shapes_dir, tmp_path):
    stage = bound_stage(recipe_for(shapes_dir, "train.dead_code_restart_steps=5"), tmp_path)
    batch = first_batch(stage)
    img = batch["image"]
    with torch.no_grad():
        used_before = stage.model.img_to_codes(img).indices.unique()
    stage.step(batch, 0)
    q = stage.model.quantizer
    q.step += 100  # nothing used for 100 steps: every code is dead now
    q.last_used_step[used_before] = q.step  # ...except the ones this batch just used
    stage.after_step(1)
    assert stage.restarted == q.codebook_size - len(used_before) > 0
    with torch.no_grad():
        used_after = stage.model.img_to_codes(img).indices.unique()
    revived = set(used_after.tolist()) - set(used_before.tolist())
    assert revived, "no re-seeded code is chosen by the images whose features seeded it"
    assert stage.metrics(1)["restarted"] == stage.restarted


def test_kmeans_init_fits_the_codebooks_to_the_first_batch(shapes_dir, tmp_path):
    stage = bound_stage(recipe_for(shapes_dir, "train.kmeans_init=true"), tmp_path)
    q = stage.model.quantizer
    img = first_batch(stage)["image"]

    def mean_distance_to_nearest_code() -> float:
        f = stage.model.encode_features(img).permute(0, 2, 3, 1).reshape(-1, q.code_dim)
        z_sem, z_pix = (torch.nn.functional.normalize(h, dim=1) for h in f.split([32, 8], dim=1))
        sem, pix = q.codebooks()
        d = torch.cdist(z_sem, sem).pow(2) + torch.cdist(z_pix, pix).pow(2)
        return float(d.min(dim=1).values.mean())

    with torch.no_grad():
        before = mean_distance_to_nearest_code()
        stage.step(first_batch(stage), 0)  # the first step runs k-means before its forward
        after = mean_distance_to_nearest_code()
    assert not stage.kmeans_pending and after < 0.5 * before


def test_evaluate_reports_psnr_usage_and_writes_a_grid(shapes_dir, tmp_path):
    stage = bound_stage(recipe_for(shapes_dir), tmp_path)
    stage.model.eval()
    result = stage.evaluate(step=7)
    assert 0 < result["psnr"] < 60 and 0 < result["usage"] <= 1 and result["ppl"] >= 1
    assert {"usage@1", "usage@16", "l2", "semantic"} <= set(result) and "lpips" not in result
    assert (tmp_path / "samples" / "recon-00000007.png").is_file()


def test_val_split_holds_images_out(shapes_dir):
    recipe = recipe_for(shapes_dir, "data.val_limit=8")
    train_paths, val_paths, where = split_train_val(recipe)
    assert len(val_paths) == 1 and not set(val_paths) & set(train_paths) and "held out" in where
    assert len(train_paths) + len(val_paths) == 12


def test_train_tokenizer_command_writes_a_loadable_run(shapes_dir, tmp_path):
    from tokenflow_cli.cli.app import app
    from tokenflow_cli.tokenizer.model import load_tokenizer

    run = tmp_path / "run"
    args = ["train-tokenizer", "tiny", "-o", str(run), "--steps", "2", "--device", "cpu", "--seed", "5",
            "--set", f"data.train={shapes_dir}", "--set", "train.batch_size=4", "--set", "train.eval_every=2",
            "--set", "model.quantizer.codebook_size=64", "--set", "data.val_limit=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "finished step 2" in result.output and "PSNR" in result.output
    tok = load_tokenizer(run)
    assert tok.codebook_size == 64
    saved = load_recipe(run / "recipe.yaml", TokenizerRecipe)
    assert saved.train.seed == 5 and saved.train.steps == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train", "eval"] and "usage@16" in rows[0]
    again = CliRunner().invoke(app, [*args[:5], "3", *args[6:]])  # --steps 3: resumes at step 2
    assert again.exit_code == 0 and "resumed from" in again.output and "finished step 3" in again.output


def test_command_rejects_missing_lpips_backbone_clearly(shapes_dir, tmp_path, monkeypatch, cli_error):
    from tokenflow_cli.cli.app import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    result = CliRunner().invoke(app, ["train-tokenizer", "tiny", "-o", str(tmp_path / "r"), "--steps", "1",
                                      "--set", f"data.train={shapes_dir}", "--set", "train.loss.lpips_weight=1"])
    assert result.exit_code == 1
    assert "vgg16-397923af.pth" in result.output and "lpips_weight=0" in result.output
    cli_error(result, "vgg16-397923af.pth", "train.loss.lpips_weight=0", code=1)


def test_lpips_loads_the_cached_backbone(tmp_path, monkeypatch):
    import torchvision

    from tokenflow_cli.eval.image_metrics import build_lpips, lpips_backbone_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.alexnet().features.state_dict()
    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in reference.items()}, path)
    perceptual = build_lpips("alex")
    assert perceptual.label == "lpips-alex" and not perceptual.random_backbone
    assert torch.equal(perceptual.module.net.slice1[0].weight, reference["0.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert perceptual(x, x).abs().max() < 1e-6 and (perceptual(x, -x) > 0).all()


def test_random_backbone_is_labelled(tmp_path, monkeypatch):
    from tokenflow_cli.eval.image_metrics import build_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert "RANDOM" in build_lpips("alex", allow_random_backbone=True).label


def test_stage_rejects_mismatched_sizes(shapes_dir):
    recipe = recipe_for(shapes_dir)
    with pytest.raises(ValueError, match="data.image_size"):
        TokenizerStage(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, image_size=32)))
