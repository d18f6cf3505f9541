"""Configuration of DiT-based object detectors: the single source of truth for every shape and weight."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# DiT geometries from Peebles & Xie (2023), table 1; "tiny" is ours, for tests and smoke runs.
DIT_BACKBONE_PRESETS = {
    "DiT-S/2": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 2},
    "DiT-B/2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 2},
    "DiT-L/2": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 2},
    "DiT-XL/2": {"hidden_size": 1152, "num_hidden_layers": 28, "num_attention_heads": 16, "patch_size": 2},
}

# Whole tiny detectors (a few ten thousand parameters) for tests and smoke runs.
TINY_PRESETS = {
    "tiny": {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 4, "in_channels": 3,
        "vae_config": None, "image_size": (64, 64), "out_indices": (1, 3), "d_model": 32,
        "pyramid_scales": (2.0, 1.0, 0.5), "num_queries": 10, "num_query_groups": 2, "decoder_layers": 2,
        "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "decoder_n_points": 2, "num_class_embeds": 10,
        "frequency_embedding_size": 32,
    },
    "tiny-latent": {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 2, "in_channels": 4,
        "vae_config": {
            "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32,
            "scaling_factor": 0.18215,
        },
        "image_size": (32, 32), "out_indices": (1, 3), "d_model": 32, "pyramid_scales": (2.0, 1.0, 0.5),
        "num_queries": 10, "num_query_groups": 2, "decoder_layers": 2, "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64, "decoder_n_points": 2, "num_class_embeds": 10, "frequency_embedding_size": 32,
    },
}

# diffusers' AutoencoderKL configuration of stabilityai/sd-vae-ft-ema, the VAE shipped with facebook/DiT-XL-2-256.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


class DiTGeometryMixin:
    """Quantities derived from the DiT geometry fields, shared by the detector and the backbone configs."""

    @property
    def vae_downsample_factor(self) -> int:
        """Pixels per latent cell along each axis (1 in pixel space)."""
        if self.vae_config is None:
            return 1
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def backbone_stride(self) -> int:
        """Pixels per backbone token along each axis; input height and width must be multiples of it."""
        return self.vae_downsample_factor * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class DiTDetectionConfig(DiTGeometryMixin, PretrainedConfig):
    r"""
    Configuration of [`DiTDetectionModel`] and [`DiTForObjectDetection`].

    The defaults describe `facebook/DiT-XL-2-256`: a DiT-XL/2 on the latents of the SD VAE (stride 8), so one
    backbone token covers 16x16 pixels. Build other sizes with [`DiTDetectionConfig.from_preset`].

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, patch_size, mlp_ratio:
            DiT geometry. Tokens are `patch_size x patch_size` patches of the VAE latents (or of the pixels when
            `vae_config` is `None`).
        in_channels (`int`): channels the DiT patchifies: the VAE's `latent_channels`, or 3 in pixel space.
        num_class_embeds (`int`): classes of the pretrained class-conditional DiT (1000 for ImageNet). The label
            table has one more row, the null class `num_class_embeds`, which is always the one used.
        frequency_embedding_size (`int`): size of the sinusoidal timestep features fed to the timestep MLP.
        timestep_freq_shift (`int`): frequency shift of those features: 1 as in diffusers' DiT, 0 as in the
            original facebookresearch/DiT code (`exp(-log(1e4) * i / (half - shift))`).
        attention_norm_eps, mlp_norm_eps (`float`): epsilons of the affine-free layer norms before attention and
            before the MLP of each block. diffusers' DiT uses 1e-6 and 1e-5, the original DiT code 1e-6 for both.
        attention_bias (`bool`): whether the q, k, v projections have biases.
        base_grid_size (`int`): side of the token grid the backbone was pretrained on (diffusers'
            `sample_size // patch_size`); other grids get sin-cos positions interpolated onto it, as diffusers does.
            Defaults to `image_size[0] // backbone_stride`.
        vae_config (`dict`, *optional*): diffusers `AutoencoderKL` configuration (with `scaling_factor`, optional
            `shift_factor`). Only its encoder is built, and it is frozen. `None` makes a pixel-space DiT.
        image_size (`tuple[int, int]`): (height, width) in pixels that the image processor resizes to; a multiple
            of `backbone_stride`. The model itself accepts any such multiple.
        feature_timestep (`int`): diffusion timestep (0..num_train_timesteps-1) at which features are read. The
            latents are noised to it with a fixed noise (seed `noise_seed`); 0 means no noise at all.
        num_train_timesteps, beta_start, beta_end: the linear DDPM beta schedule the DiT was trained with.
        noise_seed (`int`): seed of the fixed noise, so that features are deterministic.
        fold_conditioning (`bool`): whether each block holds the constant adaLN modulation that its MLP produces for
            (`feature_timestep`, null class) instead of the MLP and the timestep / class embedders: identical
            outputs, about a third fewer backbone weights. Set by `model.fold_conditioning()`; `feature_timestep`
            is then baked in.
        out_indices (`tuple[int]`): 0-based indices of the backbone blocks whose outputs feed the neck.
        d_model (`int`): width of the neck, the decoder and the heads.
        pyramid_scales (`tuple[float]`): resolutions of the simple feature pyramid relative to the token grid
            (2.0 = twice as fine, 0.5 = half); ViTDet-style. Each must be 4, 2, 1, 0.5 or 0.25.
        num_queries (`int`): object queries used at inference.
        num_query_groups (`int`): training-only query groups (Group DETR); each is matched one-to-one on its own,
            which gives the decoder many positive samples per object. Inference uses the first group only.
        decoder_layers, decoder_attention_heads, decoder_ffn_dim, decoder_n_points, dropout:
            DETR-style decoder with multi-scale deformable cross-attention (`decoder_n_points` sampling points per
            head and pyramid level) and iterative box refinement.
        class_cost, bbox_cost, giou_cost: Hungarian matching costs (focal classification, L1, generalised IoU).
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient: loss weights.
        focal_alpha, focal_gamma: sigmoid focal loss parameters (also used by the matching cost).
        initializer_range (`float`): std of the truncated normal init of new (head) weights.
    """

    model_type = "dit_detection"
    # Only logits and boxes are concatenated across the eval set by the Trainer (transformers#25939, #34675).
    keys_to_ignore_at_inference = ["loss_dict", "auxiliary_outputs", "proposal_logits", "proposal_boxes",
                                   "token_logits", "token_boxes", "last_hidden_state", "hidden_states"]

    def __init__(
        self,
        hidden_size: int = 1152,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        patch_size: int = 2,
        in_channels: int = 4,
        mlp_ratio: float = 4.0,
        num_class_embeds: int = 1000,
        frequency_embedding_size: int = 256,
        timestep_freq_shift: int = 1,
        attention_norm_eps: float = 1e-6,
        mlp_norm_eps: float = 1e-5,
        attention_bias: bool = True,
        base_grid_size: int | None = None,
        vae_config: dict | None = SD_VAE_CONFIG,
        image_size: tuple[int, int] | list[int] | int = (256, 256),
        feature_timestep: int = 100,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_seed: int = 0,
        fold_conditioning: bool = False,
        out_indices: tuple[int, ...] | list[int] = (13, 17, 20),
        d_model: int = 256,
        pyramid_scales: tuple[float, ...] | list[float] = (2.0, 1.0, 0.5),
        num_queries: int = 300,
        num_query_groups: int = 13,
        decoder_layers: int = 3,
        decoder_attention_heads: int = 8,
        decoder_ffn_dim: int = 1024,
        decoder_n_points: int = 4,
        dropout: float = 0.0,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        class_loss_coefficient: float = 2.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.mlp_ratio = mlp_ratio
        self.num_class_embeds = num_class_embeds
        self.frequency_embedding_size = frequency_embedding_size
        self.timestep_freq_shift = timestep_freq_shift
        self.attention_norm_eps = attention_norm_eps
        self.mlp_norm_eps = mlp_norm_eps
        self.attention_bias = attention_bias
        self.vae_config = copy.deepcopy(vae_config) if vae_config is not None else None
        self.image_size = _pair(image_size)
        self.base_grid_size = base_grid_size if base_grid_size is not None else self.image_size[0] // self.backbone_stride
        self.feature_timestep = feature_timestep
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.noise_seed = noise_seed
        self.fold_conditioning = fold_conditioning
        self.out_indices = [int(i) for i in out_indices]
        self.d_model = d_model
        self.pyramid_scales = [float(s) for s in pyramid_scales]
        self.num_queries = num_queries
        self.num_query_groups = num_query_groups
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_n_points = decoder_n_points
        self.dropout = dropout
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.class_loss_coefficient = class_loss_coefficient
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTDetectionConfig":
        """A config from a preset: a DiT backbone geometry (`"DiT-XL/2"`, other defaults unchanged) or a whole tiny
        detector (`"tiny"`: pixel space, `"tiny-latent"`: with a tiny VAE); `overrides` win."""
        presets = {**DIT_BACKBONE_PRESETS, **TINY_PRESETS}
        if name not in presets:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(presets)}.")
        return cls(**{**copy.deepcopy(presets[name]), **overrides})

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}.")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for 2-D sin-cos positions.")
        if self.vae_config is not None and self.vae_config.get("latent_channels", 4) != self.in_channels:
            raise ValueError(f"in_channels {self.in_channels} != the VAE's latent_channels "
                             f"{self.vae_config.get('latent_channels')}.")
        if self.vae_config is None and self.in_channels != 3:
            raise ValueError(f"A pixel-space DiT (vae_config=None) reads RGB images: in_channels must be 3, "
                             f"got {self.in_channels}.")
        if not self.out_indices or sorted(set(self.out_indices)) != self.out_indices:
            raise ValueError(f"out_indices must be non-empty, sorted and unique, got {self.out_indices}.")
        if self.out_indices[0] < 0 or self.out_indices[-1] >= self.num_hidden_layers:
            raise ValueError(f"out_indices {self.out_indices} must lie in [0, {self.num_hidden_layers - 1}] "
                             f"(num_hidden_layers={self.num_hidden_layers}).")
        for scale in self.pyramid_scales:
            if scale not in (4.0, 2.0, 1.0, 0.5, 0.25):
                raise ValueError(f"pyramid_scales entries must be 4, 2, 1, 0.5 or 0.25, got {scale}.")
        if not 0 <= self.feature_timestep < self.num_train_timesteps:
            raise ValueError(f"feature_timestep {self.feature_timestep} must lie in [0, {self.num_train_timesteps}).")
        if self.d_model % self.decoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by decoder_attention_heads "
                             f"{self.decoder_attention_heads}.")
        if self.num_query_groups < 1:
            raise ValueError(f"num_query_groups must be >= 1, got {self.num_query_groups}.")
        for side in self.image_size:
            if side % self.backbone_stride:
                raise ValueError(f"image_size {tuple(self.image_size)} is not a multiple of the backbone stride "
                                 f"{self.backbone_stride} (VAE x{self.vae_downsample_factor}, patch {self.patch_size}).")


# The fields of a `DiTDetectionConfig` that describe the backbone (VAE + DiT + fixed conditioning), not the head.
BACKBONE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "in_channels", "mlp_ratio",
                   "num_class_embeds", "frequency_embedding_size", "timestep_freq_shift", "attention_norm_eps",
                   "mlp_norm_eps", "attention_bias", "base_grid_size", "vae_config", "image_size", "feature_timestep",
                   "num_train_timesteps", "beta_start", "beta_end", "noise_seed", "fold_conditioning",
                   "initializer_range")


class DiTBackboneConfig(DiTGeometryMixin, BackboneConfigMixin, PretrainedConfig):
    r"""
    The DiT (and its VAE encoder) of a [`DiTDetectionConfig`] as a transformers backbone for `AutoBackbone`: any
    detector of transformers that takes a `backbone_config` can read DiT features, e.g.
    `DetrConfig(backbone_config=DiTBackboneConfig(...), use_timm_backbone=False, use_pretrained_backbone=False)`.

    Stages are "stem" (the embedded patches) and "stage1" ... "stageN" (the outputs of the N DiT blocks); each
    feature map is `[batch, hidden_size, H / stride, W / stride]`.

    Args:
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*): the stages to return, by name
            or by index into the stage names (0 = stem); default: the last block.
        **kwargs: the backbone fields of `DiTDetectionConfig` (`BACKBONE_FIELDS`: geometry, `vae_config`,
            `feature_timestep`, ...), with the same defaults (DiT-XL/2-256 with its VAE).
    """

    model_type = "dit_backbone"

    def __init__(self, out_features: list[str] | None = None, out_indices: list[int] | None = None, **kwargs):
        dit = {key: kwargs.pop(key) for key in BACKBONE_FIELDS if key in kwargs}
        # A detector config with one tap validates the geometry and fills in every default.
        detection = DiTDetectionConfig(**dit, out_indices=[dit.get("num_hidden_layers", 28) - 1])
        for key in BACKBONE_FIELDS:
            setattr(self, key, getattr(detection, key))
        super().__init__(**kwargs)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def to_detection_config(self, **head_fields) -> DiTDetectionConfig:
        """A `DiTDetectionConfig` with this backbone (the head from `head_fields` or the defaults)."""
        head_fields.setdefault("out_indices", [self.num_hidden_layers - 1])
        return DiTDetectionConfig(**{key: getattr(self, key) for key in BACKBONE_FIELDS}, **head_fields)


def _pair(size) -> list[int]:
    if isinstance(size, int):
        return [size, size]
    height, width = size
    return [int(height), int(width)]
