"""Where a detector to train comes from (`load_detector`) and how it is trained (the named recipes).

A pretrained DiT gets the two-stage recipe: the head first on a frozen backbone, then the backbone too at a smaller,
layer-wise decayed learning rate. A DiT with random weights gets the scratch recipe: everything trains from step 0
at one learning rate (freezing a random backbone only slows it down). The recipe follows the source unless named.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..configuration_dit_detection import BACKBONE_ARGUMENTS, DiTDetectionConfig
from ..convert_diffusers_dit import checkpoint_kind
from ..modeling_dit_detection import DiTForObjectDetection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How the two stages are set up: stage one's length in epochs (0 = no stage one), the backbone's learning rate
    as a fraction of the head's, and the layer-wise decay of the backbone's rate."""

    name: str
    freeze_backbone_epochs: float
    backbone_learning_rate_scale: float
    layer_decay: float


RECIPES = {
    "two-stage": Recipe("two-stage", freeze_backbone_epochs=1.0, backbone_learning_rate_scale=0.1, layer_decay=0.9),
    "scratch": Recipe("scratch", freeze_backbone_epochs=0.0, backbone_learning_rate_scale=1.0, layer_decay=1.0),
}


def default_recipe(pretrained_backbone: bool) -> str:
    return "two-stage" if pretrained_backbone else "scratch"


@dataclass(frozen=True)
class StagePlan:
    """The two stages of one run. Lengths are epochs, or optimiser steps when `in_steps` (a run given
    `--max_steps`); a stage of length 0 is skipped. Stage two trains the backbone (or its last
    `unfreeze_last_blocks` blocks) with its last block at `backbone_learning_rate` and each earlier block at
    `layer_decay` times the next one's rate."""

    recipe: str
    stage_one: float
    stage_two: float
    in_steps: bool
    backbone_learning_rate: float
    layer_decay: float
    unfreeze_last_blocks: int | None = None

    def describe(self) -> str:
        unit = "steps" if self.in_steps else "epochs"
        scope = "the whole DiT" if self.unfreeze_last_blocks is None else f"its last {self.unfreeze_last_blocks} blocks"
        frozen = (f"stage one {self.stage_one:g} {unit} on a frozen backbone, stage two" if self.stage_one > 0
                  else "no frozen stage,")
        return (f"recipe {self.recipe}: {frozen} {self.stage_two:g} {unit} training {scope} (last block at lr "
                f"{self.backbone_learning_rate:g}, layer decay {self.layer_decay:g})")


def plan_stages(pretrained_backbone: bool, learning_rate: float, num_train_epochs: float, max_steps: int = -1,
                recipe: str | None = None, freeze_backbone_epochs: float | None = None,
                backbone_learning_rate: float | None = None, layer_decay: float | None = None,
                unfreeze_last_blocks: int | None = None) -> StagePlan:
    """The stages of a run: the named `recipe` (default: two-stage for a pretrained backbone, scratch otherwise),
    with any value given explicitly winning over the recipe's. With `max_steps > 0` the run is `max_steps` steps,
    split between the stages in the proportion of `freeze_backbone_epochs` to `num_train_epochs`. Raises a
    `ValueError` naming the option for values that make no sense."""
    chosen = RECIPES.get(recipe or default_recipe(pretrained_backbone))
    if chosen is None:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe!r}.")
    freeze = chosen.freeze_backbone_epochs if freeze_backbone_epochs is None else freeze_backbone_epochs
    layer_decay = chosen.layer_decay if layer_decay is None else layer_decay
    if backbone_learning_rate is None:
        backbone_learning_rate = learning_rate * chosen.backbone_learning_rate_scale
    _check_positive("--learning_rate", learning_rate)
    _check_positive("--backbone_learning_rate", backbone_learning_rate)
    if not 0 < layer_decay <= 1:
        raise ValueError(f"--layer_decay must lie in (0, 1] (1 = no decay), got {layer_decay}.")
    if unfreeze_last_blocks is not None and unfreeze_last_blocks < 1:
        raise ValueError(f"--unfreeze_last_blocks must be >= 1 (leave it out to train the whole DiT), got "
                         f"{unfreeze_last_blocks}.")
    _check_positive("--num_train_epochs", num_train_epochs)
    if not 0 <= freeze <= num_train_epochs:
        raise ValueError(f"--freeze_backbone_epochs {freeze} must lie in [0, --num_train_epochs {num_train_epochs}]: "
                         "stage one is part of the run.")
    if max_steps > 0:
        stage_one = round(max_steps * freeze / num_train_epochs)
        return StagePlan(chosen.name, stage_one, max_steps - stage_one, True, backbone_learning_rate, layer_decay,
                         unfreeze_last_blocks)
    return StagePlan(chosen.name, freeze, num_train_epochs - freeze, False, backbone_learning_rate, layer_decay,
                     unfreeze_last_blocks)


def _check_positive(option: str, value: float) -> None:
    if not value > 0 or value == float("inf"):  # also NaN
        raise ValueError(f"{option} must be a positive number, got {value}.")


@dataclass
class LoadedDetector:
    """A detector to train: the model, what it was made from (`"preset"`, `"diffusers"` or `"dit_detection"`), and
    whether its backbone holds pretrained weights."""

    model: DiTForObjectDetection
    source_kind: str
    pretrained_backbone: bool


def check_weights_files(source: str | None) -> None:
    """For a local checkpoint folder (a saved detector, or a diffusers pipeline with transformer/ and vae/): every
    safetensors file opens, its header and size consistent (nothing else is read). A truncated or corrupt file is an
    error naming it, before any data is read."""
    if source is None or not os.path.isdir(source):
        return
    folder = Path(source)
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("transformer/*.safetensors"),
                        *folder.glob("vae/*.safetensors")]):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"--model_name_or_path {source}: {path} is not a readable safetensors file ({error}): it "
                             "is truncated or corrupt; save or download it again.") from error


def load_detector(source: str | None, id2label: dict[int, str], preset: str = "small", overrides: dict | None = None,
                  vae: str | None = None, fold_conditioning: bool = False, token: str | None = None,
                  image_sizes: list[tuple[int, int]] | None = None) -> LoadedDetector:
    """A `DiTForObjectDetection` for `id2label` from `source`: a diffusers DiT (pipeline or transformer; pretrained
    backbone, new head), a saved `DiTForObjectDetection` (fine-tuned further; a new class head where the classes
    differ), or, when `source` is None, a new model from `preset` with random weights.

    `overrides`: `DiTDetectionConfig` and backbone fields. For a saved detector, a field that shapes weights
    (backbone geometry, decoder sizes) is an error: it would silently re-initialise trained weights.
    `image_sizes`: (height, width) of the training images; a new model without an `image_size` override takes its
    input size from them (`input_size_from_data`), so objects keep their size in pixels as far as the cap allows.
    """
    overrides = dict(overrides or {})
    if source is None:
        config = DiTDetectionConfig.from_preset(preset, id2label=id2label, **overrides)
        if image_sizes and "image_size" not in overrides:
            config.image_size = input_size_from_data(image_sizes, config.backbone_stride)
            logger.info("Input size %s (height x width) from the median training image size.", config.image_size)
        model = DiTForObjectDetection(config)
        loaded = LoadedDetector(model, "preset", pretrained_backbone=False)
    elif checkpoint_kind(source, token=token) == "diffusers":
        model = DiTForObjectDetection.from_diffusers(source, vae=vae, id2label=id2label, hub_kwargs={"token": token},
                                                     **overrides)
        loaded = LoadedDetector(model, "diffusers", pretrained_backbone=True)
    else:
        model = _load_saved_detector(source, id2label, overrides, token)
        loaded = LoadedDetector(model, "dit_detection", pretrained_backbone=True)
    if fold_conditioning:
        loaded.model.fold_conditioning()
    return loaded


def _load_saved_detector(source: str, id2label: dict[int, str], overrides: dict, token) -> DiTForObjectDetection:
    saved = DiTDetectionConfig.from_pretrained(source, token=token)
    fields = saved.to_dict()
    backbone_fields = fields.pop("backbone_config")
    changed = []
    for key, value in overrides.items():
        target = backbone_fields if key in BACKBONE_ARGUMENTS else fields
        if key in WEIGHT_SHAPING_FIELDS and not _same(value, target.get(key)):
            changed.append(key)
        if key in ("out_indices", "out_features"):
            if len(value) != len(backbone_fields["out_indices"]):
                changed.append(key)  # the neck has one norm per tap
            backbone_fields.pop("out_features" if key == "out_indices" else "out_indices")
        target[key] = value
    if changed:
        raise ValueError(f"{source} is a trained detector: changing {sorted(changed)} would re-initialise or "
                         "invalidate its trained weights. Start from its DiT (a diffusers checkpoint) or a preset to change them.")
    same_classes = {int(k): v for k, v in saved.id2label.items()} == dict(id2label)
    config = DiTDetectionConfig(**{**fields, "backbone_config": backbone_fields, "id2label": id2label,
                                   "label2id": {name: i for i, name in id2label.items()}})
    # A new class list gets new class heads (and only those): their shapes differ, or their rows mean other classes.
    return DiTForObjectDetection.from_pretrained(source, config=config, token=token,
                                                 ignore_mismatched_sizes=not same_classes)


def _same(a, b) -> bool:
    """Equal as JSON would store them (tuples and lists alike)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# Fields whose change alters parameter shapes or counts of a saved detector (the class heads follow id2label), or
# what its trained weights mean (`box_update`, `anchor_tokens`, `box_refinement`: how its box heads' outputs become
# boxes).
WEIGHT_SHAPING_FIELDS = frozenset(BACKBONE_ARGUMENTS - {"image_size", "feature_timestep", "out_features", "out_indices",
                                                        "noise_seed", "initializer_range", "base_grid_size"}) | {
    "d_model", "pyramid_scales", "neck", "neck_blocks", "neck_norm", "num_queries", "num_query_groups", "decoder_layers",
    "decoder_attention_heads", "decoder_ffn_dim", "decoder_n_points", "box_update", "anchor_tokens",
    "box_refinement"}
# Every field a config override may set: the backbone's and the detector's.
CONFIG_FIELDS = BACKBONE_ARGUMENTS | (frozenset(inspect.signature(DiTDetectionConfig.__init__).parameters)
                                      - {"self", "kwargs", "backbone_config"})


def check_config_overrides(overrides: dict) -> None:
    """Unknown keys are an error (a typo would otherwise be stored as an unused config attribute)."""
    unknown = sorted(set(overrides) - CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"Unknown config fields {unknown}; known: {', '.join(sorted(CONFIG_FIELDS))}.")


def input_size_from_data(sizes: list[tuple[int, int]], stride: int, cap: int = 512) -> tuple[int, int]:
    """The input (height, width) for a detector trained from scratch: the median image size of the data, each side
    rounded to a multiple of `stride` and capped at `cap` pixels (keeping the aspect ratio), at least one stride."""
    if not sizes:
        raise ValueError("No image sizes to choose an input size from.")
    height = statistics.median(h for h, _ in sizes)
    width = statistics.median(w for _, w in sizes)
    scale = min(1.0, cap / max(height, width))
    return tuple(max(stride, round(side * scale / stride) * stride) for side in (height, width))


__all__ = ["CONFIG_FIELDS", "LoadedDetector", "StagePlan", "plan_stages", "WEIGHT_SHAPING_FIELDS", "check_config_overrides", "RECIPES", "Recipe", "default_recipe", "input_size_from_data",
           "load_detector"]
