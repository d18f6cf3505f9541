"""Model cards of trained detectors, rendered from the Jinja template in `model_cards/` with huggingface_hub."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_dit_detection import DiTDetectionConfig
from .recipes import StagePlan

SUMMARY_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
# The metric names of the `model-index` results, as the Hub's leaderboards read them.
MODEL_INDEX_METRICS = {"map": "mAP", "map_50": "mAP@0.5", "map_75": "mAP@0.75"}


@dataclass
class TrainingSummary:
    """What the card says about how the model was made. `metrics` are the Trainer's, prefixed `eval_` / `test_`."""

    model_name: str
    dataset_name: str
    metrics: dict
    repo_id: str | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    num_train_images: int = 0
    num_eval_images: int = 0
    stage_plan: StagePlan | None = None
    feature_caching: str = ""  # how stage one's features were cached (`FeatureCaching.describe`), if they were
    hyperparameters: dict = field(default_factory=dict)
    data_report: str = ""
    compute_description: str = ""
    tags: list[str] = field(default_factory=list)


def _metric_split(metrics: dict) -> str:
    return "test" if metrics.get("test_map") is not None else "eval"


def render_model_card(config: DiTDetectionConfig, summary: TrainingSummary, template_path: str | Path) -> ModelCard:
    """The card of a trained detector: YAML metadata (library, pipeline tag, license, base model, dataset, tags,
    `model-index` with the mAP results) and the sections of the template (`model_cards/template.md` of the
    repository, which run_detection.py passes)."""
    split = _metric_split(summary.metrics)
    metrics = {key.removeprefix(f"{split}_"): value for key, value in summary.metrics.items() if key.startswith(f"{split}_")}
    eval_results = [
        EvalResult(task_type="object-detection", task_name="Object Detection", dataset_type=summary.dataset_name,
                   dataset_name=summary.dataset_name, dataset_split="test" if split == "test" else "validation",
                   metric_type=name, metric_name=label, metric_value=round(float(metrics[name]), 4))
        for name, label in MODEL_INDEX_METRICS.items() if metrics.get(name) is not None
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="object-detection",
        license=summary.license,
        # The Hub rejects metadata naming local folders: only Hub ids go there (the text names any source).
        base_model=summary.base_model if _is_hub_id(summary.base_model) else None,
        datasets=[summary.dataset_name] if _is_hub_id(summary.dataset_name) and "/" in summary.dataset_name else None,
        tags=["object-detection", "dit", "diffusion-transformer", "detr", *summary.tags],
        model_name=summary.model_name,
        eval_results=eval_results or None,
    )
    class_names = set(config.id2label.values())
    per_class = [(key.removeprefix("ap_"), value) for key, value in metrics.items()
                 if key.startswith("ap_") and key.removeprefix("ap_") in class_names]
    dit = config.backbone_config
    backbone = (f"DiT with {dit.num_hidden_layers} blocks used, hidden size {dit.hidden_size}, "
                f"{dit.num_attention_heads} heads, patch {dit.patch_size}")
    backbone += (f", on the latents of a frozen VAE encoder (x{dit.vae_downsample_factor})" if dit.vae_config
                 else ", in pixel space")
    plan = summary.stage_plan
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=summary.model_name,
        repo_id=summary.repo_id or summary.model_name,
        base_model=summary.base_model,
        dataset_name=summary.dataset_name,
        metrics={f"{split}_{key}": value for key, value in metrics.items()} if split == "test" else {},
        backbone_description=backbone,
        feature_timestep=dit.feature_timestep,
        out_features=list(dit.out_features),
        fold_conditioning=dit.fold_conditioning,
        pyramid_scales=list(config.pyramid_scales),
        neck=config.neck,
        neck_blocks=config.neck_blocks,
        neck_norm=config.neck_norm,
        box_update=config.box_update,
        box_refinement=config.box_refinement,
        anchor_tokens=config.anchor_tokens,
        class_loss=config.class_loss,
        num_queries=config.num_queries,
        decoder_layers=config.decoder_layers,
        num_query_groups=config.num_query_groups,
        image_size=list(config.image_size),
        stride=config.backbone_stride,
        id2label=config.id2label,
        num_train_images=summary.num_train_images,
        num_eval_images=summary.num_eval_images,
        data_report=summary.data_report,
        recipe=plan.recipe if plan else None,
        stage_unit="steps" if plan and plan.in_steps else "epoch(s)",
        stage_one=plan.stage_one if plan else 0,
        stage_two=plan.stage_two if plan else 0,
        stage_two_scope=("the whole DiT" if plan is None or plan.unfreeze_last_blocks is None
                         else f"the last {plan.unfreeze_last_blocks} DiT blocks"),
        backbone_learning_rate=plan.backbone_learning_rate if plan else None,
        layer_decay=plan.layer_decay if plan else None,
        feature_caching=summary.feature_caching,
        hyperparameters=summary.hyperparameters,
        evaluation_table=[(key, metrics[key]) for key in SUMMARY_METRICS if metrics.get(key) is not None],
        per_class_table=per_class,
        compute_description=summary.compute_description or f"Trained on {platform.machine()} ({platform.system()}).",
        framework_versions=_framework_versions(),
    )


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id ("name" or "owner/name") and is not a local path."""
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _framework_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for name in ("transformers", "torch", "torchvision", "diffusers", "datasets", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
