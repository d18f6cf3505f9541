"""Configuration of DiT-based object detectors: the single source of truth for every shape and weight."""

from __future__ import annotations

import copy
import inspect
import logging

from transformers import PretrainedConfig

from .configuration_dit_backbone import DIT_PRESETS, DiTBackboneConfig, as_pair, check_positive_integers

logger = logging.getLogger(__name__)

_TINY_HEAD = {"d_model": 32, "pyramid_scales": (2.0, 1.0, 0.5), "num_queries": 10, "num_query_groups": 2,
              "decoder_layers": 2, "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "decoder_n_points": 2}
# Whole small detectors, backbone and head fields together: "tiny" and "tiny-latent" (a few ten thousand parameters)
# for tests and smoke runs, "small" (~670 k) the pixel-space DiT that run_detection.py trains from scratch on its
# built-in data, with the relative box update and anchors of 3.2 tokens (at 256 x 256 with 8-pixel patches exactly
# LW-DETR's 0.05 x 2^level of the image): measured better than the logit update on both built-in layouts; and with
# LW-DETR's lite box refinement: as good as the iterative one on both layouts, with fewer ops; and with the C2f neck
# (LW-DETR's projector, BatchNorm): 0.213 -> 0.633 test mAP at 687 steps on the dense-small layout, the part of
# LW-DETR that closed the gap to it. README "What training compute buys".
DETECTOR_PRESETS = {
    "tiny": {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 4, "in_channels": 3,
        "vae_config": None, "image_size": (64, 64), "out_indices": (2, 4), "num_class_embeds": 10,
        "frequency_embedding_size": 32, **_TINY_HEAD,
    },
    "tiny-latent": {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 2, "in_channels": 4,
        "vae_config": {
            "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32,
            "scaling_factor": 0.18215,
        },
        "image_size": (32, 32), "out_indices": (2, 4), "num_class_embeds": 10, "frequency_embedding_size": 32,
        **_TINY_HEAD,
    },
    "small": {
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 4, "in_channels": 3,
        "vae_config": None, "image_size": (64, 64), "out_indices": (2, 4), "num_class_embeds": 1,
        "frequency_embedding_size": 64, "feature_timestep": 0, "d_model": 64, "pyramid_scales": (2.0, 1.0, 0.5),
        "num_queries": 20, "num_query_groups": 4, "decoder_layers": 3, "decoder_attention_heads": 4,
        "decoder_ffn_dim": 128, "decoder_n_points": 4, "box_update": "relative", "anchor_tokens": 3.2,
        "box_refinement": "lite", "neck": "c2f", "neck_blocks": 2,
    },
}
PRESETS = (*DIT_PRESETS, *DETECTOR_PRESETS)
BOX_REFINEMENTS = ("iterative", "lite")
NECKS = ("simple", "c2f")
NECK_NORMS = ("batch", "layer")
BOX_UPDATES = ("logit", "relative")
CLASS_LOSSES = ("focal", "iou_aware")

# The `DiTBackboneConfig` arguments; in `from_preset` overrides these go to the backbone, the rest to the detector.
BACKBONE_ARGUMENTS = frozenset(inspect.signature(DiTBackboneConfig.__init__).parameters) - {"self", "kwargs"}
# Before the backbone had its own config (version 0.1), a saved detector config held these fields flat, with
# `out_indices` counting blocks from 0 (now: stages, 0 = the embedded patches).
_FLAT_BACKBONE_FIELDS = BACKBONE_ARGUMENTS - {"out_features"}


class DiTDetectionConfig(PretrainedConfig):
    r"""
    Configuration of [`DiTDetectionModel`] and [`DiTForObjectDetection`]: a [`DiTBackboneConfig`] (the DiT and its
    VAE encoder, which stages are tapped) plus the neck, decoder, matching and loss. The defaults describe a detector
    on `facebook/DiT-XL-2-256`. Build other sizes with [`DiTDetectionConfig.from_preset`].

    Args:
        backbone_config (`DiTBackboneConfig` or `dict`, *optional*): the backbone; its `out_indices` are the stages
            whose feature maps feed the neck. Default: DiT-XL/2-256 with the SD VAE, taps at 1/2, 5/8, 3/4 depth.
        d_model (`int`): width of the neck, the decoder and the heads.
        pyramid_scales (`tuple[float]`): resolutions of the neck's feature pyramid relative to the token grid (2.0 =
            twice as fine, 0.5 = half); ViTDet-style. Each must be 4, 2, 1, 0.5 or 0.25.
        neck (`str`): `"simple"`: ViTDet's simple feature pyramid over the fused taps (`DiTDetectionNeck`, linear up
            to its LayerNorms); `"c2f"`: LW-DETR's projector (`CrossStagePartialNeck`: each tap resampled, then
            concatenated and mixed by a C2f convolution block per level), measured far better on small, dense objects
            from scratch (README "What training compute buys").
        neck_blocks (`int`): with the simple neck, residual convolution bottlenecks (`NeckBlock`) on every pyramid
            level after its linear projection (0 = none); with the C2f neck, the pairs of 3x3 convolutions in each
            level's C2f block (LW-DETR: 3, its small sizes 2).
        neck_norm (`str`): normalisation in the C2f neck's convolutions: `"batch"` (LW-DETR's) or `"layer"`
            (independent of the batch: for small per-device batches).
        num_queries (`int`): object queries used at inference.
        num_query_groups (`int`): training-only query groups (Group DETR); each is matched one-to-one on its own, which
            gives the decoder many positive samples per object. Inference uses the first group only.
        decoder_layers, decoder_attention_heads, decoder_ffn_dim, decoder_n_points, dropout: DETR-style decoder with
            multi-scale deformable cross-attention (`decoder_n_points` sampling points per head and pyramid level)
            and box refinement.
        box_refinement (`str`): `"iterative"` (Deformable DETR: each decoder layer corrects the previous layer's
            boxes and samples around them) or `"lite"` (LW-DETR: every layer samples around the selected proposals
            and corrects them; one query position embedding for all layers).
        box_update (`str`): how a predicted correction moves a reference box (decoder layers and proposals):
            `"logit"` (Deformable DETR: added in inverse-sigmoid space) or `"relative"` (LW-DETR's reparametrisation:
            the centre moves in units of the box's size, the size is scaled by `exp(delta)`; the "small" preset uses
            it with `anchor_tokens=3.2`, measured better on small and on large objects, README "What training
            compute buys").
        anchor_tokens (`float`, *optional*): side of the proposal anchor at each pyramid token, in tokens of its
            level (so anchors keep their size relative to the features whatever the image size). `None`: a square of
            0.05 x 2^level of the image (Deformable DETR's and LW-DETR's rule; detectors saved without this field).
        class_cost, bbox_cost, giou_cost: Hungarian matching costs (focal classification, L1, generalised IoU).
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient: loss weights.
        focal_alpha, focal_gamma: sigmoid focal loss parameters (also used by the matching cost).
        class_loss (`str`): `"focal"` (sigmoid focal loss, one-hot targets) or `"iou_aware"` (LW-DETR's IoU-aware
            BCE: a matched query's target is `prob**focal_alpha * IoU**(1 - focal_alpha)`, so scores rank boxes by how
            well they fit; LW-DETR pairs it with `class_loss_coefficient=1`).
        initializer_range (`float`): std of the truncated normal init of new (head) weights.
        category_ids (`list[int]`, *optional*): the dataset's own id of each label (label i is category
            `category_ids[i]`, e.g. COCO's 1..90 with gaps), for outputs in the dataset's ids (COCO results). `None`:
            the label ids are the dataset's.
    """

    model_type = "dit_detection"
    sub_configs_defaults = {"backbone_config": DiTBackboneConfig}
    # Only logits and boxes are concatenated across the eval set by the Trainer (transformers#25939, #34675).
    keys_to_ignore_at_inference = ["loss_dict", "auxiliary_outputs", "init_reference_points", "last_hidden_state",
                                   "hidden_states"]

    def __init__(
        self,
        backbone_config: DiTBackboneConfig | dict | None = None,
        d_model: int = 256,
        pyramid_scales: tuple[float, ...] | list[float] = (2.0, 1.0, 0.5),
        neck: str = "simple",
        neck_blocks: int = 0,
        neck_norm: str = "batch",
        num_queries: int = 300,
        num_query_groups: int = 13,
        decoder_layers: int = 3,
        decoder_attention_heads: int = 8,
        decoder_ffn_dim: int = 1024,
        decoder_n_points: int = 4,
        dropout: float = 0.0,
        box_refinement: str = "iterative",
        box_update: str = "logit",
        anchor_tokens: float | None = None,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        class_loss_coefficient: float = 2.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_loss: str = "focal",
        initializer_range: float = 0.02,
        category_ids: list[int] | None = None,
        **kwargs,
    ):
        flat = {key: kwargs.pop(key) for key in list(kwargs) if key in _FLAT_BACKBONE_FIELDS}
        if flat:
            backbone_config = _backbone_config_from_flat_fields(flat, backbone_config, kwargs)
        if backbone_config is None:
            backbone_config = DiTBackboneConfig()
        elif isinstance(backbone_config, dict):
            backbone_config = DiTBackboneConfig(**backbone_config)
        elif not isinstance(backbone_config, DiTBackboneConfig):
            raise ValueError(f"backbone_config must be a DiTBackboneConfig or a dict, got "
                             f"{type(backbone_config).__name__}.")
        self.backbone_config = backbone_config
        self.d_model = d_model
        self.pyramid_scales = [float(s) for s in pyramid_scales]
        self.neck = neck
        self.neck_blocks = neck_blocks
        self.neck_norm = neck_norm
        self.num_queries = num_queries
        self.num_query_groups = num_query_groups
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_n_points = decoder_n_points
        self.dropout = dropout
        self.box_refinement = box_refinement
        self.box_update = box_update
        self.anchor_tokens = None if anchor_tokens is None else float(anchor_tokens)
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.class_loss_coefficient = class_loss_coefficient
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_loss = class_loss
        self.initializer_range = initializer_range
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        super().__init__(**kwargs)
        self._validate()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiTDetectionConfig:
        """A config from a preset: a DiT geometry (`"DiT-S/2"`, `"DiT-B/2"`, `"DiT-L/2"`, `"DiT-XL/2"`; the rest as
        DiT-XL/2-256, taps following the depth) or a whole small detector (`"tiny"`: pixel space, `"tiny-latent"`:
        with a tiny VAE, `"small"`: run_detection.py's built-in model). `overrides` win; backbone fields
        (`BACKBONE_ARGUMENTS`, e.g. `image_size`, `out_indices`, `feature_timestep`) go to the backbone config, the
        others to the detector."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {list(PRESETS)}.")
        if "backbone_config" in overrides:
            raise ValueError("from_preset builds the backbone_config from the preset; give backbone fields "
                             f"({', '.join(sorted(BACKBONE_ARGUMENTS))}) as overrides instead.")
        fields = {**copy.deepcopy(DIT_PRESETS.get(name) or DETECTOR_PRESETS[name]), **overrides}
        backbone = {key: fields.pop(key) for key in list(fields) if key in BACKBONE_ARGUMENTS}
        return cls(backbone_config=DiTBackboneConfig(**backbone), **fields)

    @property
    def image_size(self) -> list[int]:
        """(height, width) in pixels that the image processor resizes to (the backbone config's)."""
        return self.backbone_config.image_size

    @image_size.setter
    def image_size(self, value) -> None:
        # The pretraining grid (`base_grid_size`) stays: positions are interpolated onto it for any input size.
        self.backbone_config.image_size = as_pair(value)
        self.backbone_config._validate_geometry()

    @property
    def backbone_stride(self) -> int:
        """Pixels per backbone token along each axis; input height and width must be multiples of it."""
        return self.backbone_config.backbone_stride

    def _validate(self) -> None:
        check_positive_integers(self, ("d_model", "num_queries", "num_query_groups", "decoder_layers",
                                       "decoder_attention_heads", "decoder_ffn_dim", "decoder_n_points"))
        if self.d_model % self.decoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by decoder_attention_heads "
                             f"{self.decoder_attention_heads}.")
        if (self.d_model // self.decoder_attention_heads) % 2:
            raise ValueError(f"d_model / decoder_attention_heads = {self.d_model // self.decoder_attention_heads} "
                             "must be even (sin-cos box embedding).")
        if isinstance(self.neck_blocks, bool) or not isinstance(self.neck_blocks, int) or self.neck_blocks < 0:
            raise ValueError(f"neck_blocks must be an integer >= 0, got {self.neck_blocks!r}.")
        if self.neck not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {self.neck!r}.")
        if self.neck_norm not in NECK_NORMS:
            raise ValueError(f"neck_norm must be one of {NECK_NORMS}, got {self.neck_norm!r}.")
        if not self.pyramid_scales:
            raise ValueError("pyramid_scales must name at least one level.")
        for scale in self.pyramid_scales:
            if scale not in (4.0, 2.0, 1.0, 0.5, 0.25):
                raise ValueError(f"pyramid_scales entries must be 4, 2, 1, 0.5 or 0.25, got {scale}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}.")
        if self.box_refinement not in BOX_REFINEMENTS:
            raise ValueError(f"box_refinement must be one of {BOX_REFINEMENTS}, got {self.box_refinement!r}.")
        if self.box_update not in BOX_UPDATES:
            raise ValueError(f"box_update must be one of {BOX_UPDATES}, got {self.box_update!r}.")
        if self.anchor_tokens is not None and not self.anchor_tokens > 0:
            raise ValueError(f"anchor_tokens must be > 0 (or None), got {self.anchor_tokens}.")
        if self.class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}.")
        if not 0 < self.focal_alpha < 1 or self.focal_gamma < 0:
            raise ValueError(f"focal_alpha must lie in (0, 1) and focal_gamma be >= 0, got {self.focal_alpha}, "
                             f"{self.focal_gamma}.")
        for name in ("class_cost", "bbox_cost", "giou_cost", "class_loss_coefficient", "bbox_loss_coefficient",
                     "giou_loss_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.category_ids is not None:
            if len(self.category_ids) != self.num_labels or len(set(self.category_ids)) != len(self.category_ids):
                raise ValueError(f"category_ids must give one distinct dataset id per label ({self.num_labels} "
                                 f"labels), got {self.category_ids}.")


def _backbone_config_from_flat_fields(flat: dict, backbone_config, kwargs: dict) -> DiTBackboneConfig:
    """The backbone config of a detector config saved before `backbone_config` existed (version 0.1)."""
    if backbone_config is not None:
        raise ValueError(f"Backbone fields {sorted(flat)} were given next to backbone_config: put them in it.")
    if "transformers_version" not in kwargs:  # not read from a saved file: a call with the old, flat arguments
        raise ValueError(f"Backbone fields {sorted(flat)} belong in backbone_config=DiTBackboneConfig(...), or use "
                         "DiTDetectionConfig.from_preset(name, **fields).")
    if "out_indices" in flat:  # 0-based blocks then; stage i + 1 now
        flat["out_indices"] = [int(block) + 1 for block in flat["out_indices"]]
    logger.info("Read a detector config saved before version 0.2 (flat backbone fields); it is saved in the new "
                "format (backbone_config) from now on.")
    return DiTBackboneConfig(**flat)


__all__ = ["BACKBONE_ARGUMENTS", "DETECTOR_PRESETS", "DiTDetectionConfig", "PRESETS"]
