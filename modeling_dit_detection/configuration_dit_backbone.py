"""Configuration of the DiT backbone: the optional frozen VAE encoder, the fixed diffusion conditioning and the DiT."""

from __future__ import annotations

import copy

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# DiT geometries from Peebles & Xie (2023), table 1.
DIT_PRESETS = {
    "DiT-S/2": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 2},
    "DiT-B/2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 2},
    "DiT-L/2": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 2},
    "DiT-XL/2": {"hidden_size": 1152, "num_hidden_layers": 28, "num_attention_heads": 16, "patch_size": 2},
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

# Where DiT features probe best (DESIGN.md): about 1/2, 5/8 and 3/4 of the depth.
DEFAULT_TAP_FRACTIONS = (0.5, 0.625, 0.75)


def default_out_indices(num_hidden_layers: int) -> list[int]:
    """Stages (1 = the output of the first block) at about 1/2, 5/8 and 3/4 of the depth; e.g. 14, 18, 21 of 28."""
    return sorted({max(1, round(num_hidden_layers * fraction)) for fraction in DEFAULT_TAP_FRACTIONS})


class DiTBackboneConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of [`DiTBackbone`]: a Diffusion Transformer (optionally on the latents of a frozen VAE encoder) read
    as a feature extractor at a fixed diffusion timestep and the null class. The defaults describe
    `facebook/DiT-XL-2-256`: DiT-XL/2 on the SD VAE's latents (stride 8 x patch 2 = 16 pixels per token).

    Stages are `"stem"` (the embedded patches, index 0) and `"stage1"` ... `"stageN"` (the outputs of the N blocks,
    index i = block i). Each feature map is `[batch, hidden_size, H / backbone_stride, W / backbone_stride]`.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, patch_size, mlp_ratio: DiT geometry. Tokens are
            `patch_size x patch_size` patches of the VAE latents (or of the pixels when `vae_config` is `None`).
        in_channels (`int`): channels the DiT patchifies: the VAE's `latent_channels`, or 3 in pixel space.
        num_class_embeds (`int`): classes of the pretrained class-conditional DiT (1000 for ImageNet). The label table
            has one more row, the null class `num_class_embeds`, which is always the one used.
        frequency_embedding_size (`int`): size of the sinusoidal timestep features fed to the timestep MLP.
        timestep_freq_shift (`int`): frequency shift of those features: 1 as in diffusers' DiT, 0 as in the original
            facebookresearch/DiT code (`exp(-log(1e4) * i / (half - shift))`).
        attention_norm_eps, mlp_norm_eps (`float`): epsilons of the affine-free layer norms before attention and before
            the MLP of each block. diffusers' DiT uses 1e-6 and 1e-5, the original DiT code 1e-6 for both.
        attention_bias (`bool`): whether the q, k, v projections have biases.
        vae_config (`dict`, *optional*): diffusers `AutoencoderKL` configuration (with `scaling_factor`, optional
            `shift_factor`). Only its encoder is built, and it is frozen. `None` makes a pixel-space DiT.
        image_size (`tuple[int, int]`): (height, width) in pixels that images are resized to for this backbone; a
            multiple of `backbone_stride`. The model itself accepts any such multiple.
        base_grid_size (`int`): side of the token grid the DiT was pretrained on (diffusers' `sample_size //
            patch_size`); other grids get sin-cos positions interpolated onto it, as diffusers does. Defaults to
            `image_size[0] // backbone_stride`.
        feature_timestep (`int`): diffusion timestep (0..num_train_timesteps-1) at which features are read. The latents
            are noised to it with a fixed noise (seed `noise_seed`); 0 means no noise at all.
        num_train_timesteps, beta_start, beta_end: the linear DDPM beta schedule the DiT was trained with.
        noise_seed (`int`): seed of the fixed noise, so that features are deterministic.
        fold_conditioning (`bool`): whether each block holds the constant adaLN modulation that its MLP produces for
            (`feature_timestep`, null class) instead of the MLP and the timestep / class embedders: identical outputs,
            about a third fewer weights. Set by `fold_conditioning()` on the model; `feature_timestep` is then baked in.
        initializer_range (`float`): std of the normal init of new weights.
        out_features (`list[str]`, *optional*), out_indices (`list[int]`, *optional*): the stages whose feature maps
            the backbone returns, by name or by index into the stage names (negative indices count from the end).
            Default: the stages at about 1/2, 5/8 and 3/4 of the depth (`default_out_indices`).
    """

    model_type = "dit_backbone"

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
        vae_config: dict | None = SD_VAE_CONFIG,
        image_size: tuple[int, int] | list[int] | int = (256, 256),
        base_grid_size: int | None = None,
        feature_timestep: int = 100,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_seed: int = 0,
        fold_conditioning: bool = False,
        initializer_range: float = 0.02,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
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
        self.image_size = as_pair(image_size)
        self.feature_timestep = feature_timestep
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.noise_seed = noise_seed
        self.fold_conditioning = fold_conditioning
        self.initializer_range = initializer_range
        self._validate_geometry()
        self.base_grid_size = base_grid_size if base_grid_size is not None else self.image_size[0] // self.backbone_stride
        super().__init__(**kwargs)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_hidden_layers + 1)]
        if out_features is None and out_indices is None:
            out_indices = default_out_indices(num_hidden_layers)
        if out_indices is not None:
            out_indices = [int(i) for i in out_indices]
            outside = [i for i in out_indices if not -len(self.stage_names) <= i < len(self.stage_names)]
            if outside:  # transformers' own check lets e.g. -6 of 5 stages through
                raise ValueError(f"out_indices {out_indices} must index the {len(self.stage_names)} stages "
                                 f"(0 = stem, i = block i, negative from the end); {outside} do not.")
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        # One meaning: non-negative positions in `stage_names` (a negative index counts from the end once, here).
        self.set_output_features_output_indices(out_features=None, out_indices=[
            i % len(self.stage_names) for i in self.out_indices])
        self._validate_conditioning()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiTBackboneConfig:
        """A DiT geometry of the paper (`"DiT-S/2"`, `"DiT-B/2"`, `"DiT-L/2"`, `"DiT-XL/2"`); other fields default to
        DiT-XL/2-256's (SD VAE, 256x256), `overrides` win. The taps follow the depth unless given."""
        if name not in DIT_PRESETS:
            raise ValueError(f"Unknown DiT preset {name!r}; choose one of {sorted(DIT_PRESETS)}.")
        return cls(**{**DIT_PRESETS[name], **overrides})

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

    def _validate_geometry(self) -> None:
        check_positive_integers(self, ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                                       "in_channels"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}.")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for 2-D sin-cos positions.")
        if self.vae_config is not None:
            if not isinstance(self.vae_config, dict) or "block_out_channels" not in self.vae_config:
                raise ValueError(f"vae_config must be a diffusers AutoencoderKL config dict with block_out_channels, "
                                 f"got {self.vae_config!r}.")
            if self.vae_config.get("latent_channels", 4) != self.in_channels:
                raise ValueError(f"in_channels {self.in_channels} != the VAE's latent_channels "
                                 f"{self.vae_config.get('latent_channels', 4)}.")
        elif self.in_channels != 3:
            raise ValueError(f"A pixel-space DiT (vae_config=None) reads RGB images: in_channels must be 3, "
                             f"got {self.in_channels}.")
        for side in self.image_size:
            if side < self.backbone_stride or side % self.backbone_stride:
                raise ValueError(f"image_size {tuple(self.image_size)} is not a positive multiple of the backbone "
                                 f"stride {self.backbone_stride} (VAE x{self.vae_downsample_factor}, patch "
                                 f"{self.patch_size}).")

    def _validate_conditioning(self) -> None:
        if not 0 <= self.feature_timestep < self.num_train_timesteps:
            raise ValueError(f"feature_timestep {self.feature_timestep} must lie in [0, {self.num_train_timesteps}).")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"The beta schedule needs 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                             f"{self.beta_end}.")
        if self.base_grid_size < 1:
            raise ValueError(f"base_grid_size must be >= 1, got {self.base_grid_size}.")


def check_positive_integers(config: PretrainedConfig, names: tuple[str, ...]) -> None:
    """Raise a `ValueError` naming the first of `names` whose value is not a positive int (bools are not ints here)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def as_pair(size) -> list[int]:
    """An image size given as an int (square) or (height, width), as [height, width]."""
    if isinstance(size, int) and not isinstance(size, bool):
        return [size, size]
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {size!r}.")
    height, width = size
    return [int(height), int(width)]


__all__ = ["DIT_PRESETS", "DiTBackboneConfig", "SD_VAE_CONFIG", "default_out_indices"]
