"""The DiT backbone: an optional frozen VAE encoder, fixed diffusion noise and conditioning, and a Diffusion
Transformer whose blocks are read as feature maps (a transformers `BackboneMixin` model, `AutoBackbone`).

pixels [-1, 1] -> VAE latents x scaling factor (or the pixels themselves) -> fixed noise at `feature_timestep` ->
patch embedding + 2-D sin-cos positions (any H x W) -> adaLN-Zero blocks conditioned on (timestep, null class) ->
the outputs of the blocks in `config.out_indices` as `[batch, hidden_size, H / stride, W / stride]` maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dit_backbone import DiTBackboneConfig

def sincos_position_embedding(
    embed_dim: int, grid_height: int, grid_width: int, base_grid_size: int, device=None
) -> torch.Tensor:
    """2-D sin-cos positions, `[grid_height * grid_width, embed_dim]`, tokens in row-major order.

    The first half of the channels encodes the column, the second the row. Coordinates of any grid are
    interpolated onto the pretraining grid (`base_grid_size` per side), as diffusers' DiT does, so non-square and
    larger inputs keep positions in the range the backbone was trained on. Computed in float64, as diffusers does.
    """
    rows = torch.arange(grid_height, dtype=torch.float64, device=device) * (base_grid_size / grid_height)
    cols = torch.arange(grid_width, dtype=torch.float64, device=device) * (base_grid_size / grid_width)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    half = embed_dim // 2
    return torch.cat([_sincos_1d(half, grid_cols.flatten()), _sincos_1d(half, grid_rows.flatten())], dim=1).float()


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2))
    angles = positions[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def timestep_features(timesteps: torch.Tensor, dim: int, freq_shift: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features `[N, dim]`, cosines first (DiT's convention)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def alphas_cumprod(config: DiTBackboneConfig) -> torch.Tensor:
    """Cumulative signal rates of DiT's linear DDPM schedule, `[num_train_timesteps]`, float64."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)



def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. q, k, v: `[batch, heads, tokens, head_dim]`; returns `[batch, tokens, heads, head_dim]`."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DiTAttention(nn.Module):
    def __init__(self, config: DiTBackboneConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=config.attention_bias)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens, hidden]` -> `[batch, tokens, hidden]`, through the configured attention implementation."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(self, query, key, value, None, scaling=self.scaling, dropout=0.0)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1))


class DiTMLP(nn.Module):
    def __init__(self, config: DiTBackboneConfig):
        super().__init__()
        intermediate = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, intermediate)
        self.fc2 = nn.Linear(intermediate, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(hidden_states)))


# tanh(u) = 2 sigmoid(2u) - 1, so the tanh approximation of GELU, x (1 + tanh(u)) / 2 with
# u = sqrt(2 / pi) (x + 0.044715 x^3), is x sigmoid(2u).
GELU_TANH_SCALE = 2 * math.sqrt(2 / math.pi)
GELU_TANH_CUBIC = 0.044715


def gelu_tanh(hidden_states: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (DiT's MLP activation), elementwise.

    In float32 on a CPU, outside autograd (inference, a frozen backbone), it is x sigmoid(2u) computed in place on one
    new tensor: torch's tanh-GELU CPU kernel takes about 2.2x that time (its tanh is the costly part;
    `benchmarks/dit_block_ops.py`), and the two agree to float32 rounding. Where autograd records it, in other dtypes
    and on GPUs (where torch's kernel is one fused pass) it is torch's kernel.
    """
    if (
        hidden_states.device.type != "cpu"
        or hidden_states.dtype != torch.float32
        or (torch.is_grad_enabled() and hidden_states.requires_grad)
    ):
        return F.gelu(hidden_states, approximate="tanh")
    output = hidden_states * hidden_states
    output.mul_(GELU_TANH_CUBIC * GELU_TANH_SCALE).add_(GELU_TANH_SCALE).mul_(hidden_states)
    return output.sigmoid_().mul_(hidden_states)


def modulated_layer_norm(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """LayerNorm over the last axis without parameters of its own, then DiT's modulation `x (1 + scale) + shift`.

    hidden_states `[batch, tokens, hidden]`; shift, scale `[1, 1, hidden]` (one conditioning for the whole batch), so
    the modulation is the norm's affine transform: one kernel instead of three, and torch's affine LayerNorm CPU kernel
    is faster than its plain one (`benchmarks/dit_block_ops.py`).
    """
    return F.layer_norm(hidden_states, hidden_states.shape[-1:], (1 + scale).flatten(), shift.flatten(), eps)


class DiTBlock(GradientCheckpointingLayer):
    """adaLN-Zero transformer block: the conditioning vector sets shift, scale and gate of both sub-layers.

    With `config.fold_conditioning`, the conditioning is fixed, so the block holds the resulting modulation
    (`[6 * hidden]`) as a parameter instead of the MLP that computes it.
    """

    def __init__(self, config: DiTBackboneConfig):
        super().__init__()
        hidden = config.hidden_size
        self.attention_norm_eps = config.attention_norm_eps
        self.attention = DiTAttention(config)
        self.mlp_norm_eps = config.mlp_norm_eps
        self.mlp = DiTMLP(config)
        if config.fold_conditioning:
            self.modulation = nn.Parameter(torch.zeros(6 * hidden))
        else:
            self.adaln_modulation = nn.Linear(hidden, 6 * hidden)

    def compute_modulation(self, conditioning: torch.Tensor | None) -> torch.Tensor:
        """`[1, 1, 6 * hidden]`: shift, scale, gate of attention, then of the MLP."""
        if conditioning is None:
            return self.modulation[None, None, :]
        return self.adaln_modulation(F.silu(conditioning))[:, None, :]

    def fold(self, conditioning: torch.Tensor) -> None:
        """Replace the modulation MLP by its output for `conditioning` (`[1, hidden]`)."""
        self.modulation = nn.Parameter(self.compute_modulation(conditioning).detach().flatten())
        del self.adaln_modulation

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """hidden_states `[batch, tokens, hidden]`, conditioning `[1, hidden]` (None when folded) ->
        `[batch, tokens, hidden]`."""
        modulation = self.compute_modulation(conditioning)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        attention_input = modulated_layer_norm(hidden_states, shift_attn, scale_attn, self.attention_norm_eps)
        hidden_states = hidden_states + gate_attn * self.attention(attention_input)
        mlp_input = modulated_layer_norm(hidden_states, shift_mlp, scale_mlp, self.mlp_norm_eps)
        hidden_states = hidden_states + gate_mlp * self.mlp(mlp_input)
        return hidden_states


class DiTTimestepEmbedding(nn.Module):
    def __init__(self, config: DiTBackboneConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.frequency_embedding_size, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))



class DiTVAEEncoder(nn.Module):
    """The encoder half of a diffusers `AutoencoderKL`, frozen; parameter names match diffusers' (`encoder.*`,
    `quant_conv.*`) so pretrained VAE weights load one to one."""

    def __init__(self, vae_config: dict):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder  # only latent DiTs need diffusers

        latent_channels = vae_config.get("latent_channels", 4)
        self.encoder = Encoder(
            in_channels=vae_config.get("in_channels", 3),
            out_channels=latent_channels,
            down_block_types=tuple(vae_config["down_block_types"]),
            block_out_channels=tuple(vae_config["block_out_channels"]),
            layers_per_block=vae_config.get("layers_per_block", 2),
            act_fn=vae_config.get("act_fn", "silu"),
            norm_num_groups=vae_config.get("norm_num_groups", 32),
            double_z=True,
            mid_block_add_attention=vae_config.get("mid_block_add_attention", True),
        )
        use_quant_conv = vae_config.get("use_quant_conv", True)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.scaling_factor = vae_config.get("scaling_factor", 0.18215)
        self.shift_factor = vae_config.get("shift_factor") or 0.0
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values `[batch, 3, H, W]` in [-1, 1] -> latents `[batch, latent_channels, H / f, W / f]`:
        the posterior mean, shifted and scaled as the DiT saw it in training."""
        moments = self.encoder(pixel_values)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]
        return (mean - self.shift_factor) * self.scaling_factor



def diffusion_input(pixel_values: torch.Tensor, vae: nn.Module | None, config) -> torch.Tensor:
    """pixels `[B, 3, H, W]` in [-1, 1] -> what the DiT reads: (VAE latents, or pixels) noised to
    `config.feature_timestep` with a fixed noise that depends only on the latent shape and `config.noise_seed`."""
    latents = vae(pixel_values) if vae is not None else pixel_values
    timestep = config.feature_timestep
    if timestep == 0:
        return latents
    generator = torch.Generator().manual_seed(config.noise_seed)
    noise = torch.randn((1, *latents.shape[1:]), generator=generator).to(latents.device, latents.dtype)
    signal_rate = alphas_cumprod(config)[timestep].item()
    return math.sqrt(signal_rate) * latents + math.sqrt(1 - signal_rate) * noise


def check_pixel_values(pixel_values: torch.Tensor, config) -> None:
    """A clear error for inputs the backbone cannot read: not `[B, 3, H, W]`, or H, W not multiples of the stride."""
    stride = config.backbone_stride
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [batch, 3, height, width], got {tuple(pixel_values.shape)}.")
    height, width = pixel_values.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(
            f"pixel_values of {height}x{width} (height x width) are not a multiple of the backbone stride {stride} "
            f"(VAE x{config.vae_downsample_factor}, patch {config.patch_size}); resize or pad them, "
            f"e.g. with DiTDetectionImageProcessor."
        )


class DiTBackbonePreTrainedModel(PreTrainedModel):
    config: DiTBackboneConfig
    config_class = DiTBackboneConfig
    base_model_prefix = "dit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Keyed by the layer, found through its owner: transformers never calls this for a module that owns no
        # parameters of its own in a model outside the library (see DiTForObjectDetection._init_weights).
        for owner in self.modules():
            init_dit_layer(owner, module)


def init_dit_layer(owner: nn.Module, layer: nn.Module) -> None:
    """DiT's own initialisation of new weights (facebookresearch/DiT, `models.py`), for `layer` when `owner` is the
    part of the DiT that holds it; runs after the generic init of `layer`, so it overrides it:

    - every Linear of a block: xavier-uniform weights, zero bias (the generic normal(0.02) is far smaller at narrow
      widths: at 64 channels a block's branches start at ~1e-4 of the residual stream and a randomly initialised
      detector sat on a loss plateau for its first epochs; see README "Performance");
    - the patch embedding: xavier-uniform as the Linear it is (fan-in = channels x patch^2, fan-out = hidden);
    - the adaLN modulation (the Linear, or a folded block's vector): zero, so every block starts as the identity
      (adaLN-Zero).
    The timestep MLP and the class embedding keep the generic normal(`initializer_range`), as in DiT.
    """
    if isinstance(owner, DiTBlock):
        if layer is owner and isinstance(getattr(owner, "modulation", None), nn.Parameter):
            init.zeros_(owner.modulation)
        elif layer is getattr(owner, "adaln_modulation", None):
            init.zeros_(layer.weight)
            init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear) and any(layer is child for child in owner.modules()):
            init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                init.zeros_(layer.bias)
    elif isinstance(owner, DiTBackbone) and layer is owner.patch_embed:
        fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        init.uniform_(layer.weight, -bound, bound)
        init.zeros_(layer.bias)


def freeze_vae(model: nn.Module) -> None:
    """The VAE encoder never trains. Loading replaces parameter objects, which forgets `requires_grad=False`; a VAE
    parameter that requires grad but never gets one would break DDP's gradient reduction, so loaders call this."""
    for module in model.modules():
        if isinstance(module, DiTVAEEncoder):
            module.requires_grad_(False)


class DiTBackbone(BackboneMixin, DiTBackbonePreTrainedModel):
    """The VAE encoder (if any) and the DiT, without its noise-prediction head, as a transformers backbone: feature
    maps `[batch, hidden_size, H / stride, W / stride]` of the stages in `config.out_features` ("stem" = the embedded
    patches, "stageN" = the output of block N). Inputs are pixels in [-1, 1], as `DiTDetectionImageProcessor` makes
    them. Blocks after the deepest requested stage are only run when `output_hidden_states=True`."""

    def __init__(self, config: DiTBackboneConfig):
        super().__init__(config)
        self.vae = DiTVAEEncoder(config.vae_config) if config.vae_config is not None else None
        self.patch_embed = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        if not config.fold_conditioning:
            self.timestep_embedder = DiTTimestepEmbedding(config)
            # Row `num_class_embeds` is the null ("unconditional") class of classifier-free guidance.
            self.class_embedder = nn.Embedding(config.num_class_embeds + 1, config.hidden_size)
        self.layers = nn.ModuleList(DiTBlock(config) for _ in range(config.num_hidden_layers))
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Backbones saved before version 0.2 (`DiTBackboneModel`) kept the DiT under `backbone.`.
        key_mapping = {r"^backbone\.": "", **(kwargs.pop("key_mapping", None) or {})}
        model = super().from_pretrained(*args, key_mapping=key_mapping, **kwargs)
        model._weight_conversions = []  # save in today's names, never in the legacy ones that were read
        freeze_vae(model)
        return model

    @torch.no_grad()
    def fold_conditioning(self) -> None:
        """Bake the conditioning of (`feature_timestep`, null class) into every block: outputs stay identical, the
        timestep and class embedders and the blocks' modulation MLPs go (about a third of DiT-XL/2's weights)."""
        if self.config.fold_conditioning:
            return
        conditioning = self.conditioning(self.patch_embed.weight.device, self.patch_embed.weight.dtype)
        for block in self.layers:
            block.fold(conditioning)
        del self.timestep_embedder, self.class_embedder
        self.config.fold_conditioning = True

    def conditioning(self, device, dtype) -> torch.Tensor | None:
        """The block conditioning `[1, hidden]` for `feature_timestep` and the null class (None when folded)."""
        config = self.config
        if config.fold_conditioning:
            return None
        timestep = torch.tensor([config.feature_timestep], device=device)
        features = timestep_features(timestep, config.frequency_embedding_size, config.timestep_freq_shift)
        null_class = torch.tensor([config.num_class_embeds], device=device)
        return self.timestep_embedder(features.to(dtype)) + self.class_embedder(null_class)

    def diffusion_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels `[B, 3, H, W]` in [-1, 1] -> what the DiT reads (see `diffusion_input`)."""
        return diffusion_input(pixel_values, self.vae, self.config)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs) -> BackboneOutput:
        """pixel_values `[batch, 3, H, W]` in [-1, 1], H and W multiples of `config.backbone_stride` ->
        `BackboneOutput`: `feature_maps` (one `[batch, hidden_size, H / stride, W / stride]` per stage of
        `out_features`); `hidden_states` (with `output_hidden_states`): the embedded tokens and every block's output,
        `[batch, tokens, hidden_size]`, tokens in row-major order."""
        check_pixel_values(pixel_values, self.config)
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        latents = self.diffusion_input(pixel_values.to(self.dtype))  # a bf16 model gets float32 pixels too
        grid_height, grid_width = latents.shape[-2] // config.patch_size, latents.shape[-1] // config.patch_size
        hidden_states = self.patch_embed(latents).flatten(2).transpose(1, 2)
        positions = sincos_position_embedding(config.hidden_size, grid_height, grid_width, config.base_grid_size,
                                              device=latents.device)
        hidden_states = hidden_states + positions.to(hidden_states.dtype)
        conditioning = self.conditioning(latents.device, hidden_states.dtype)
        # Blocks after the deepest tap cannot change the feature maps: run them only when their states are asked for.
        num_blocks = config.num_hidden_layers if output_hidden_states else max(self.out_indices)
        states = [hidden_states]
        for block in self.layers[:num_blocks]:
            hidden_states = block(hidden_states, conditioning)
            states.append(hidden_states)
        batch = pixel_values.shape[0]
        feature_maps = tuple(states[stage].transpose(1, 2).reshape(batch, config.hidden_size, grid_height, grid_width)
                             for stage in self.out_indices)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=tuple(states) if output_hidden_states else None)


__all__ = ["DiTBackbone", "DiTBackbonePreTrainedModel"]
