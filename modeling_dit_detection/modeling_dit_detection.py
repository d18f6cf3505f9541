"""DiT-based object detector: pretrained DiT backbone (+ frozen VAE encoder), ViTDet neck, DETR-style decoder.

Data flow (see DESIGN.md): pixels in [-1, 1] -> VAE latents x scaling factor -> fixed noise at
`config.feature_timestep` -> DiT blocks conditioned on (timestep, null class) -> tapped block outputs ->
normalised and projected -> simple feature pyramid -> query selection from the pyramid tokens -> decoder with
multi-scale deformable cross-attention and iterative box refinement -> class logits and boxes per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput
from transformers.utils import ModelOutput

from .configuration_dit_detection import BACKBONE_FIELDS, DiTBackboneConfig, DiTDetectionConfig
from .loss_dit_detection import DiTDetectionCriterion, HungarianMatcher, SetPredictions, validate_labels


# ----------------------------------------------------------------------------------------------------------------
# Fixed embeddings and the noise schedule
# ----------------------------------------------------------------------------------------------------------------


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


def alphas_cumprod(config: DiTDetectionConfig) -> torch.Tensor:
    """Cumulative signal rates of DiT's linear DDPM schedule, `[num_train_timesteps]`, float64."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ----------------------------------------------------------------------------------------------------------------
# DiT backbone
# ----------------------------------------------------------------------------------------------------------------


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
    def __init__(self, config: DiTDetectionConfig):
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
    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        intermediate = int(config.hidden_size * config.mlp_ratio)
        self.fc1 = nn.Linear(config.hidden_size, intermediate)
        self.fc2 = nn.Linear(intermediate, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh"))


class DiTBlock(GradientCheckpointingLayer):
    """adaLN-Zero transformer block: the conditioning vector sets shift, scale and gate of both sub-layers.

    With `config.fold_conditioning`, the conditioning is fixed, so the block holds the resulting modulation
    (`[6 * hidden]`) as a parameter instead of the MLP that computes it.
    """

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=config.attention_norm_eps)
        self.attention = DiTAttention(config)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=config.mlp_norm_eps)
        self.mlp = DiTMLP(config)
        if config.fold_conditioning:
            self.modulation = nn.Parameter(torch.zeros(6 * hidden))
        else:
            self.adaln_modulation = nn.Linear(hidden, 6 * hidden)

    def compute_modulation(self, conditioning: torch.Tensor | None) -> torch.Tensor:
        """`[batch or 1, 1, 6 * hidden]`: shift, scale, gate of attention, then of the MLP."""
        if conditioning is None:
            return self.modulation[None, None, :]
        return self.adaln_modulation(F.silu(conditioning))[:, None, :]

    def fold(self, conditioning: torch.Tensor) -> None:
        """Replace the modulation MLP by its output for `conditioning` (`[1, hidden]`)."""
        self.modulation = nn.Parameter(self.compute_modulation(conditioning).detach().flatten())
        del self.adaln_modulation

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        """hidden_states `[batch, tokens, hidden]`, conditioning `[batch or 1, hidden]` (None when folded) ->
        `[batch, tokens, hidden]`."""
        modulation = self.compute_modulation(conditioning)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        hidden_states = hidden_states + gate_attn * self.attention(self.norm1(hidden_states) * (1 + scale_attn) + shift_attn)
        hidden_states = hidden_states + gate_mlp * self.mlp(self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp)
        return hidden_states


class DiTTimestepEmbedding(nn.Module):
    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.frequency_embedding_size, config.hidden_size)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class DiTBackbone(nn.Module):
    """The DiT trunk without its noise-prediction head: patch embedding, conditioning, adaLN-Zero blocks."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.in_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        if not config.fold_conditioning:
            self.timestep_embedder = DiTTimestepEmbedding(config)
            # Row `num_class_embeds` is the null ("unconditional") class of classifier-free guidance.
            self.class_embedder = nn.Embedding(config.num_class_embeds + 1, config.hidden_size)
        self.layers = nn.ModuleList(DiTBlock(config) for _ in range(config.num_hidden_layers))

    @torch.no_grad()
    def fold_conditioning(self) -> None:
        """Bake the conditioning of (`feature_timestep`, null class) into every block; outputs are unchanged."""
        if self.config.fold_conditioning:
            return
        conditioning = self.conditioning(self.config.feature_timestep, self.patch_embed.weight.device,
                                         self.patch_embed.weight.dtype)
        for block in self.layers:
            block.fold(conditioning)
        del self.timestep_embedder, self.class_embedder
        self.config.fold_conditioning = True

    def conditioning(self, timestep: int, device, dtype) -> torch.Tensor | None:
        """The block conditioning `[1, hidden]` for `timestep` and the null class (None when folded)."""
        config = self.config
        if config.fold_conditioning:
            return None
        features = timestep_features(torch.tensor([timestep], device=device), config.frequency_embedding_size,
                                     config.timestep_freq_shift)
        null_class = torch.tensor([config.num_class_embeds], device=device)
        return self.timestep_embedder(features.to(dtype)) + self.class_embedder(null_class)

    def forward(self, latents: torch.Tensor, timestep: int, num_blocks: int | None = None) -> tuple[torch.Tensor, ...]:
        """latents `[batch, in_channels, H, W]` -> (embedded tokens, output of block 0, ..., of block
        `num_blocks - 1`), each `[batch, tokens, hidden]`, tokens in row-major patch order (`H / patch_size` rows
        of `W / patch_size`). `num_blocks` defaults to all blocks."""
        config = self.config
        grid_height, grid_width = latents.shape[-2] // config.patch_size, latents.shape[-1] // config.patch_size
        hidden_states = self.patch_embed(latents).flatten(2).transpose(1, 2)
        positions = sincos_position_embedding(config.hidden_size, grid_height, grid_width, config.base_grid_size,
                                              device=latents.device)
        hidden_states = hidden_states + positions.to(hidden_states.dtype)
        conditioning = self.conditioning(timestep, latents.device, hidden_states.dtype)
        outputs = [hidden_states]
        for block in self.layers[:num_blocks]:
            hidden_states = block(hidden_states, conditioning)
            outputs.append(hidden_states)
        return tuple(outputs)


class DiTDetectionVAEEncoder(nn.Module):
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


# ----------------------------------------------------------------------------------------------------------------
# Neck: normalised taps -> simple feature pyramid (ViTDet)
# ----------------------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `[batch, channels, height, width]` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DiTDetectionNeck(nn.Module):
    """Tapped block outputs -> `len(pyramid_scales)` maps `[batch, d_model, h_l, w_l]`, finest first.

    DiT tokens carry a few channels of huge magnitude; each tap goes through a LayerNorm first (the same
    normalisation DiT's own blocks apply before reading their input), so no tap or channel dominates the fused map.
    """

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        hidden, d_model = config.hidden_size, config.d_model
        self.tap_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-6) for _ in config.out_indices)
        self.fuse = nn.Linear(hidden * len(config.out_indices), d_model)
        self.levels = nn.ModuleList(self._make_level(scale, d_model) for scale in config.pyramid_scales)

    @staticmethod
    def _make_level(scale: float, channels: int) -> nn.Sequential:
        if scale == 4.0:
            resample = [nn.ConvTranspose2d(channels, channels, 2, stride=2), LayerNorm2d(channels), nn.GELU(),
                        nn.ConvTranspose2d(channels, channels, 2, stride=2)]
        elif scale == 2.0:
            resample = [nn.ConvTranspose2d(channels, channels, 2, stride=2)]
        elif scale == 1.0:
            resample = []
        else:  # 0.5 or 0.25; ceil_mode keeps the border tokens of odd grids
            resample = [nn.MaxPool2d(int(1 / scale), ceil_mode=True)]
        return nn.Sequential(
            *resample,
            nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels),
        )

    def forward(self, taps: list[torch.Tensor], grid_height: int, grid_width: int) -> list[torch.Tensor]:
        fused = self.fuse(torch.cat([norm(tap) for norm, tap in zip(self.tap_norms, taps)], dim=-1))
        fused = fused.transpose(1, 2).reshape(fused.shape[0], -1, grid_height, grid_width)
        return [level(fused) for level in self.levels]


# ----------------------------------------------------------------------------------------------------------------
# DETR-style decoder
# ----------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def sine_box_embedding(boxes: torch.Tensor, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """boxes `[batch, queries, 4]` (cx, cy, w, h in 0..1) -> `[batch, queries, 2 * d_model]` sin-cos features,
    `d_model / 2` per coordinate: the positional part of the queries (conditional / DINO-style)."""
    num_feats = d_model // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # [B, Q, 4, num_feats]
    embedding = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)
    return embedding.flatten(-2).to(boxes.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to `n_points` sampled locations per head and pyramid level around its reference box
    (Deformable DETR), bilinearly sampled with `grid_sample`; cost is linear in the number of queries, not tokens."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int):
        super().__init__()
        self.n_heads, self.n_levels, self.n_points = n_heads, n_levels, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """queries `[B, Q, d]`, reference_boxes `[B, Q, 4]` (cx, cy, w, h in 0..1), memory `[B, S, d]` (the levels
        flattened row-major, finest first, `S = sum(h * w)`) -> `[B, Q, d]`."""
        batch, num_queries, d_model = queries.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        head_dim = d_model // heads
        value = self.value_proj(memory).view(batch, -1, heads, head_dim)
        offsets = self.sampling_offsets(queries).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(queries).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Offsets are in units of half the reference box, spread over the points (Deformable DETR, two-stage).
        centers, sizes = reference_boxes[:, :, None, None, None, :2], reference_boxes[:, :, None, None, None, 2:]
        grids = 2 * (centers + offsets / points * sizes * 0.5) - 1  # grid_sample wants [-1, 1]

        output = queries.new_zeros(batch * heads, head_dim, num_queries)
        values_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
        for level, ((height, width), level_value) in enumerate(zip(spatial_shapes, values_per_level)):
            level_value = level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
            level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, points, 2)
            sampled = F.grid_sample(level_value, level_grid.to(level_value.dtype), mode="bilinear",
                                    padding_mode="zeros", align_corners=False)  # [B*H, head_dim, Q, P]
            level_weights = weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, num_queries, points)
            output = output + (sampled * level_weights).sum(-1)
        output = output.view(batch, heads, head_dim, num_queries).permute(0, 3, 1, 2).reshape(batch, num_queries, d_model)
        return self.output_proj(output)


class DiTDetectionDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention to the pyramid, feed-forward; post-norm."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        d_model = config.d_model
        self.self_attn = nn.MultiheadAttention(d_model, config.decoder_attention_heads, dropout=config.dropout,
                                               batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, config.decoder_attention_heads,
                                                        len(config.pyramid_scales), config.decoder_n_points)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, query_pos, reference_boxes, memory, spatial_shapes, self_attn_mask=None):
        """hidden_states, query_pos `[B, Q, d]`; reference_boxes `[B, Q, 4]`; self_attn_mask `[Q, Q]` bool, True =
        blocked (separates query groups) -> `[B, Q, d]`."""
        query = hidden_states + query_pos
        attended = self.self_attn(query, query, hidden_states, attn_mask=self_attn_mask, need_weights=False)[0]
        hidden_states = self.self_attn_norm(hidden_states + self.dropout(attended))
        attended = self.cross_attn(hidden_states + query_pos, reference_boxes, memory, spatial_shapes)
        hidden_states = self.cross_attn_norm(hidden_states + self.dropout(attended))
        transformed = self.fc2(self.dropout(F.relu(self.fc1(hidden_states))))
        return self.ffn_norm(hidden_states + self.dropout(transformed))


class DiTDetectionDecoder(nn.Module):
    """Decoder layers with iterative box refinement: layer `l` predicts a correction of its reference boxes in
    logit space; the refined boxes (detached, as in Deformable DETR) are the next layer's references."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        self.d_model = config.d_model
        self.layers = nn.ModuleList(DiTDetectionDecoderLayer(config) for _ in range(config.decoder_layers))
        self.query_pos_head = MLP(2 * config.d_model, config.d_model, config.d_model, 2)
        self.box_heads = nn.ModuleList(MLP(config.d_model, config.d_model, 4, 3) for _ in range(config.decoder_layers))

    def forward(self, queries, reference_boxes, memory, spatial_shapes, self_attn_mask=None):
        """queries `[B, Q, d]`, reference_boxes `[B, Q, 4]` -> (hidden states `[L, B, Q, d]`, boxes `[L, B, Q, 4]`)."""
        hidden_states, all_hidden, all_boxes = queries, [], []
        for layer, box_head in zip(self.layers, self.box_heads):
            query_pos = self.query_pos_head(sine_box_embedding(reference_boxes, self.d_model))
            hidden_states = layer(hidden_states, query_pos, reference_boxes, memory, spatial_shapes, self_attn_mask)
            boxes = (box_head(hidden_states) + inverse_sigmoid(reference_boxes)).sigmoid()
            all_hidden.append(hidden_states)
            all_boxes.append(boxes)
            reference_boxes = boxes.detach()
        return torch.stack(all_hidden), torch.stack(all_boxes)


# ----------------------------------------------------------------------------------------------------------------
# Outputs and models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiTDetectionModelOutput(ModelOutput):
    """
    last_hidden_state (`[batch, queries, d_model]`): the last decoder layer's query states.
    intermediate_hidden_states (`[decoder_layers, batch, queries, d_model]`): every decoder layer's query states.
    intermediate_boxes (`[decoder_layers, batch, queries, 4]`): every layer's refined boxes, cx, cy, w, h in 0..1.
    proposal_logits (`[batch, queries, num_labels]`), proposal_boxes (`[batch, queries, 4]`): the selected
        proposals from the pyramid tokens that initialise the queries' reference boxes.
    token_logits (`[batch, pyramid tokens, num_labels]`), token_boxes (`[batch, pyramid tokens, 4]`): every pyramid
        token scored as a proposal; the loss supervises all of them (Deformable DETR's two-stage encoder loss), so
        the selection learns from every token, not only from the ones it happened to pick.
    hidden_states (tuple of `[batch, tokens, hidden_size]`): the backbone's embedded tokens and every block's
        output (`num_hidden_layers + 1` entries), when `output_hidden_states=True`.

    In training, `queries = num_queries * num_query_groups`; in eval mode, `num_queries`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    intermediate_hidden_states: torch.FloatTensor | None = None
    intermediate_boxes: torch.FloatTensor | None = None
    proposal_logits: torch.FloatTensor | None = None
    proposal_boxes: torch.FloatTensor | None = None
    token_logits: torch.FloatTensor | None = None
    token_boxes: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DiTDetectionObjectDetectionOutput(ModelOutput):
    """
    loss (scalar): weighted sum of the set-prediction losses of every decoder layer and of the proposals.
    loss_dict (`dict[str, scalar]`): the unweighted terms (`loss_class`, `loss_bbox`, `loss_giou`, suffixed by
        `_dec_{i}` for intermediate layers and `_proposals`).
    logits (`[batch, num_queries, num_labels]`): sigmoid classification logits (no background class).
    pred_boxes (`[batch, num_queries, 4]`): boxes as cx, cy, w, h normalised to 0..1 of the input image.
    auxiliary_outputs (list of `{"logits", "pred_boxes"}`): the same for every earlier decoder layer.
    proposal_logits, proposal_boxes, last_hidden_state, hidden_states: see [`DiTDetectionModelOutput`].

    Only the first query group is returned; the training-only groups enter the loss alone.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    auxiliary_outputs: list[dict] | None = None
    proposal_logits: torch.FloatTensor | None = None
    proposal_boxes: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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


class DiTDetectionPreTrainedModel(PreTrainedModel):
    config: DiTDetectionConfig
    config_class = DiTDetectionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock", "DiTDetectionDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameter objects, which forgets `requires_grad=False`; a VAE parameter that requires
        # grad but never gets one would break DDP's gradient reduction, so freeze it again here.
        model = super().from_pretrained(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, DiTDetectionVAEEncoder):
                module.requires_grad_(False)
        return model

    @classmethod
    def from_diffusers(cls, name_or_path, vae=None, id2label=None, fold_conditioning: bool = False,
                       hub_kwargs: dict | None = None, **config_overrides):
        """A model whose DiT backbone and VAE encoder are a pretrained diffusers DiT; the neck and head are new.

        Args:
            name_or_path: Hub id or folder of a diffusers DiT pipeline (e.g. `"facebook/DiT-XL-2-256"`) or of a
                lone `DiTTransformer2DModel`.
            vae: an `AutoencoderKL` or its path, for a lone latent transformer (or to replace the pipeline's).
            id2label: the detection classes, e.g. `{0: "person", 1: "car"}`.
            fold_conditioning: fold the fixed conditioning into the blocks (see `fold_conditioning()`).
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only` for the downloads.
            config_overrides: any `DiTDetectionConfig` field that is not backbone geometry (`out_indices`,
                `feature_timestep`, `num_queries`, ...). `num_hidden_layers` defaults to the deepest tap + 1.
        """
        from .convert_diffusers_dit import load_from_diffusers

        return load_from_diffusers(cls, name_or_path, vae=vae, id2label=id2label,
                                   fold_conditioning=fold_conditioning, hub_kwargs=hub_kwargs, **config_overrides)

    def fold_conditioning(self) -> None:
        """Replace every backbone block's adaLN MLP by the constant modulation it produces for
        (`config.feature_timestep`, null class). Outputs stay identical; the backbone loses the MLPs and the
        timestep and class embedders (about a third of DiT-XL/2's weights). `feature_timestep` is then fixed."""
        for module in self.modules():
            if isinstance(module, DiTBackbone):
                module.fold_conditioning()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised before their parents, so the special cases below override the generic init.
        super()._init_weights(module)
        if isinstance(module, DiTBlock) and hasattr(module, "modulation"):
            init.normal_(module.modulation, std=self.config.initializer_range)
        elif isinstance(module, MultiScaleDeformableAttention):
            init.zeros_(module.sampling_offsets.weight)
            angles = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
            directions = torch.stack([angles.cos(), angles.sin()], -1)
            directions = directions / directions.abs().max(-1, keepdim=True)[0]
            # Head h samples along its own direction, point p at distance p + 1: a spread-out initial pattern.
            grid = directions[:, None, None, :].repeat(1, module.n_levels, module.n_points, 1)
            grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32)[None, None, :, None]
            init.copy_(module.sampling_offsets.bias, grid.flatten())
            init.zeros_(module.attention_weights.weight)
            init.zeros_(module.attention_weights.bias)
            init.xavier_uniform_(module.value_proj.weight)
            init.zeros_(module.value_proj.bias)
            init.xavier_uniform_(module.output_proj.weight)
            init.zeros_(module.output_proj.bias)
        elif isinstance(module, DiTDetectionDecoder):
            for box_head in module.box_heads:  # start from "no correction" of the reference boxes
                init.zeros_(box_head.layers[-1].weight)
                init.zeros_(box_head.layers[-1].bias)
        elif isinstance(module, DiTDetectionModel):
            init.zeros_(module.proposal_box_head.layers[-1].weight)
            init.zeros_(module.proposal_box_head.layers[-1].bias)
            init.constant_(module.proposal_class_head.bias, _prior_logit())
        elif isinstance(module, DiTForObjectDetection):
            for head in module.class_heads:
                init.constant_(head.bias, _prior_logit())


def _prior_logit(prior: float = 0.01) -> float:
    """Class bias so every class starts at probability `prior`: keeps the focal loss of the many negatives small."""
    return -math.log((1 - prior) / prior)


class DiTDetectionModel(DiTDetectionPreTrainedModel):
    """VAE encoder (optional) + DiT backbone + neck + query selection + decoder; no class heads on the queries."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__(config)
        self.vae = DiTDetectionVAEEncoder(config.vae_config) if config.vae_config is not None else None
        self.backbone = DiTBackbone(config)
        self.neck = DiTDetectionNeck(config)
        d_model = config.d_model
        self.proposal_proj = nn.Linear(d_model, d_model)
        self.proposal_norm = nn.LayerNorm(d_model)
        self.proposal_class_head = nn.Linear(d_model, config.num_labels)
        self.proposal_box_head = MLP(d_model, d_model, 4, 3)
        # Content part of the queries: one learned vector per query and group; positions come from the proposals.
        self.query_embed = nn.Embedding(config.num_queries * config.num_query_groups, d_model)
        self.decoder = DiTDetectionDecoder(config)
        self.post_init()

    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels `[B, 3, H, W]` in [-1, 1] -> what the DiT reads (see `diffusion_input`)."""
        return diffusion_input(pixel_values, self.vae, self.config)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        check_pixel_values(pixel_values, self.config)

    def score_tokens(self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]):
        """Every pyramid token as an object proposal, a box around an anchor at the token:
        memory `[B, S, d]` -> (logits `[B, S, C]`, boxes `[B, S, 4]` cx, cy, w, h in 0..1)."""
        anchors = _token_anchors(spatial_shapes, memory.device, memory.dtype)  # [S, 4]
        num_queries = self.config.num_queries
        if anchors.shape[0] < num_queries:
            raise ValueError(f"The input gives {anchors.shape[0]} pyramid tokens, fewer than num_queries="
                             f"{num_queries}; use larger images or fewer queries.")
        features = self.proposal_norm(self.proposal_proj(memory))
        logits = self.proposal_class_head(features)
        boxes = (self.proposal_box_head(features) + inverse_sigmoid(anchors)).sigmoid()
        return logits, boxes

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None) -> DiTDetectionModelOutput:
        """pixel_values `[batch, 3, H, W]` in [-1, 1], H and W multiples of `config.backbone_stride`."""
        self.check_pixel_values(pixel_values)
        config = self.config
        pixel_values = pixel_values.to(self.dtype)  # a model cast to bf16 / fp16 (e.g. *_full_eval) gets float32 inputs
        latents = self.encode_latents(pixel_values)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        # Blocks after the deepest tap cannot change the detections: run them only when their states are asked for.
        num_blocks = None if output_hidden_states else config.out_indices[-1] + 1
        backbone_states = self.backbone(latents, config.feature_timestep, num_blocks)
        grid = (latents.shape[-2] // config.patch_size, latents.shape[-1] // config.patch_size)
        pyramid = self.neck([backbone_states[i + 1] for i in config.out_indices], *grid)

        spatial_shapes = [tuple(level.shape[-2:]) for level in pyramid]
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in pyramid], dim=1)
        token_logits, token_boxes = self.score_tokens(memory, spatial_shapes)
        # The best-scoring tokens' boxes become the queries' reference boxes.
        top = token_logits.max(-1).values.topk(config.num_queries, dim=1).indices
        proposal_logits = token_logits.gather(1, top[..., None].expand(-1, -1, token_logits.shape[-1]))
        proposal_boxes = token_boxes.gather(1, top[..., None].expand(-1, -1, 4))

        num_groups = config.num_query_groups if self.training else 1
        batch = pixel_values.shape[0]
        queries = self.query_embed.weight[: config.num_queries * num_groups][None].expand(batch, -1, -1)
        reference_boxes = proposal_boxes.detach().repeat(1, num_groups, 1)
        hidden, boxes = self.decoder(queries, reference_boxes, memory, spatial_shapes,
                                     _group_attention_mask(config.num_queries, num_groups, memory.device))

        return DiTDetectionModelOutput(
            last_hidden_state=hidden[-1],
            intermediate_hidden_states=hidden,
            intermediate_boxes=boxes,
            proposal_logits=proposal_logits,
            proposal_boxes=proposal_boxes,
            token_logits=token_logits,
            token_boxes=token_boxes,
            hidden_states=backbone_states if output_hidden_states else None,
        )


def _token_anchors(spatial_shapes: list[tuple[int, int]], device, dtype) -> torch.Tensor:
    """One anchor per pyramid token, `[S, 4]` cx, cy, w, h in 0..1: the token's centre, a square of 0.05 * 2^level."""
    anchors = []
    for level, (height, width) in enumerate(spatial_shapes):
        cy, cx = torch.meshgrid((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height,
                                (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width, indexing="ij")
        size = torch.full_like(cx, 0.05 * 2.0**level)
        anchors.append(torch.stack([cx, cy, size, size], -1).flatten(0, 1))
    return torch.cat(anchors).to(dtype)


def _group_attention_mask(num_queries: int, num_groups: int, device) -> torch.Tensor | None:
    """`[G*Q, G*Q]` bool, True where a query may not attend: each group only sees itself (Group DETR)."""
    if num_groups == 1:
        return None
    group = torch.arange(num_queries * num_groups, device=device) // num_queries
    return group[:, None] != group[None, :]


class DiTForObjectDetection(DiTDetectionPreTrainedModel):
    """[`DiTDetectionModel`] with a class head per decoder layer and the Hungarian set-prediction loss."""

    # The loss normalises itself by the number of target boxes; the Trainer must still average it over
    # gradient-accumulation steps rather than pass `num_items_in_batch` (a token count) to it.
    accepts_loss_kwargs = False

    def __init__(self, config: DiTDetectionConfig):
        super().__init__(config)
        self.model = DiTDetectionModel(config)
        self.class_heads = nn.ModuleList(nn.Linear(config.d_model, config.num_labels)
                                         for _ in range(config.decoder_layers))
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The saved detector folder also serves `AutoModel` (the base model) through the same remote code.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{DiTDetectionModel.__module__.rsplit('.', 1)[-1]}.{DiTDetectionModel.__name__}"
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
    ) -> DiTDetectionObjectDetectionOutput:
        """
        pixel_values (`[batch, 3, H, W]`): images in [-1, 1] (see `DiTDetectionImageProcessor`).
        labels (list of `batch` dicts, optional): `"class_labels"` `LongTensor[n]` and `"boxes"` `FloatTensor[n, 4]`
            (cx, cy, w, h normalised to 0..1); `n = 0` trains the image as a pure negative.
        """
        if labels is not None:
            validate_labels(labels, pixel_values.shape[0], self.config.num_labels)
        outputs = self.model(pixel_values, output_hidden_states=output_hidden_states)
        logits = [head(hidden) for head, hidden in zip(self.class_heads, outputs.intermediate_hidden_states)]
        boxes = outputs.intermediate_boxes

        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = self.compute_loss(logits, boxes, outputs.token_logits, outputs.token_boxes, labels)

        num_queries = self.config.num_queries  # the first group is the inference group
        return DiTDetectionObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits[-1][:, :num_queries],
            pred_boxes=boxes[-1][:, :num_queries],
            auxiliary_outputs=[{"logits": layer_logits[:, :num_queries], "pred_boxes": layer_boxes[:, :num_queries]}
                               for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])],
            proposal_logits=outputs.proposal_logits,
            proposal_boxes=outputs.proposal_boxes,
            last_hidden_state=outputs.last_hidden_state[:, :num_queries],
            hidden_states=outputs.hidden_states,
        )

    def compute_loss(self, logits, boxes, token_logits, token_boxes, labels):
        """Set-prediction loss of every decoder layer (all query groups) and of every pyramid token's proposal."""
        config = self.config
        device = token_logits.device
        labels = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in target.items()}
                  for target in labels]
        num_groups = logits[-1].shape[1] // config.num_queries
        predictions = [SetPredictions("", logits[-1], boxes[-1], num_groups)]
        predictions += [SetPredictions(f"dec_{i}", layer_logits, layer_boxes, num_groups)
                        for i, (layer_logits, layer_boxes) in enumerate(zip(logits[:-1], boxes[:-1]))]
        predictions.append(SetPredictions("proposals", token_logits, token_boxes, 1))
        matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost,
                                   config.focal_alpha, config.focal_gamma)
        criterion = DiTDetectionCriterion(matcher, config.class_loss_coefficient, config.bbox_loss_coefficient,
                                          config.giou_loss_coefficient, config.focal_alpha, config.focal_gamma)
        return criterion(predictions, labels)


# ----------------------------------------------------------------------------------------------------------------
# The DiT as a transformers backbone
# ----------------------------------------------------------------------------------------------------------------


class DiTBackboneModel(BackboneMixin, DiTDetectionPreTrainedModel):
    """The VAE encoder (if any) and the DiT of a detector as a transformers backbone (`AutoBackbone`): feature maps
    `[batch, hidden_size, H / stride, W / stride]` of the stages in `config.out_features` ("stem" = the embedded
    patches, "stageN" = the output of block N). Inputs are pixels in [-1, 1], as `DiTDetectionImageProcessor` makes
    them."""

    config: DiTBackboneConfig
    config_class = DiTBackboneConfig
    base_model_prefix = "dit"
    _no_split_modules = ["DiTBlock"]

    def __init__(self, config: DiTBackboneConfig):
        super().__init__(config)
        self.vae = DiTDetectionVAEEncoder(config.vae_config) if config.vae_config is not None else None
        self.backbone = DiTBackbone(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    @classmethod
    def from_detector(cls, detector: PreTrainedModel, out_features: list[str] | None = None,
                      out_indices: list[int] | None = None) -> DiTBackboneModel:
        """The backbone of a `DiTForObjectDetection` / `DiTDetectionModel` (e.g. one made by `from_diffusers`),
        weights shared, not copied; default stages: the detector's tapped blocks."""
        detection_config = detector.config
        if out_features is None and out_indices is None:
            out_indices = [i + 1 for i in detection_config.out_indices]
        config = DiTBackboneConfig(**{key: getattr(detection_config, key) for key in BACKBONE_FIELDS},
                                   out_features=out_features, out_indices=out_indices)
        base = getattr(detector, "model", detector)
        model = cls(config)
        model.vae, model.backbone = base.vae, base.backbone
        return model

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None, **kwargs) -> BackboneOutput:
        """pixel_values `[batch, 3, H, W]` in [-1, 1], H and W multiples of `config.backbone_stride`."""
        check_pixel_values(pixel_values, self.config)
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        latents = diffusion_input(pixel_values.to(self.dtype), self.vae, config)
        stages = [index % len(self.stage_names) for index in self.out_indices]  # -1 = the last stage
        deepest = max(stages)
        states = self.backbone(latents, config.feature_timestep,
                               None if output_hidden_states else deepest)
        batch = pixel_values.shape[0]
        grid = (latents.shape[-2] // config.patch_size, latents.shape[-1] // config.patch_size)
        feature_maps = tuple(states[i].transpose(1, 2).reshape(batch, config.hidden_size, *grid) for i in stages)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=states if output_hidden_states else None)
