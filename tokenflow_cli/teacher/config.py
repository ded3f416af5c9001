"""Config dataclasses for `tokenflow train-teacher` (a small CLIP trained contrastively on
captioned images), loaded with `config.load_recipe(path, TeacherRecipe)`.

Sections: `model` (TeacherModelConfig), `data` (TeacherDataConfig), `train` (config.TrainConfig,
shared with every stage) and `eval` (TeacherEvalConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenflow_cli.config import TrainConfig, register_recipe_kind


@dataclass
class TeacherModelConfig:
    """An open_clip CLIP (vision + text towers); the vision tower later serves as the tokenizer's
    teacher / semantic-encoder init (`model.teacher.pretrained=<file>`)."""

    name: str = "teacher-tiny"  # free-form identifier stored in checkpoints
    model_name: str = "tokenflow-tiny-vit"  # open_clip architecture (built-in or registered tiny)
    pretrained: str = ""  # initial weights: open_clip tag or local file; "" = random init
    image_size: int = 64  # must equal the architecture's vision image size


@dataclass
class TeacherDataConfig:
    """Captioned images. With `captions` empty, a shapes world of `shapes` images (seed
    `shapes_seed`) is rendered once into $TOKENFLOW_HOME/datasets and used."""

    captions: str = ""  # .jsonl with {"image", <caption field>} (paths relative to the file)
    caption_fields: tuple[str, ...] = ("caption",)  # each item uses one of these, drawn at random
    shapes: int = 4000  # images of the rendered shapes world when `captions` is ""
    shapes_seed: int = 0  # the eval sets hold out other seeds (eval/evalset.py)
    random_resized_crop: tuple[float, float] = (1.0, 1.0)  # area range; captions name positions, so mild
    val_size: int = 256  # items held out of the training captions for the periodic eval
    num_workers: int = 0


@dataclass
class TeacherEvalConfig:
    batch_size: int = 128


@register_recipe_kind("teacher")
@dataclass
class TeacherRecipe:
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TeacherEvalConfig = field(default_factory=TeacherEvalConfig)
