"""DiT-based object detector: the DiT backbone's feature maps -> neck -> DETR-style decoder -> heads.

Data flow (see DESIGN.md): `DiTBackbone` (VAE latents, fixed noise, DiT blocks) -> the tapped stages' feature maps
-> normalised -> a feature pyramid (ViTDet's simple pyramid over the fused taps, or LW-DETR's C2f projector) -> every
pyramid token scored as a proposal -> the best become the queries' reference boxes -> decoder with multi-scale
deformable cross-attention and box refinement (iterative or lite) -> class logits and boxes per layer.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dit_detection import DiTDetectionConfig
from .loss_dit_detection import DiTDetectionCriterion, HungarianMatcher, SetPredictions, validate_labels
from .modeling_dit_backbone import DiTBackbone, freeze_vae, init_dit_layer


class _PipelineSupportFilter(logging.Filter):
    """Drops the error transformers' object-detection pipeline logs for this model: it checks the model class against
    a copy of its built-in mapping, and the copy loses the classes that `AutoModelForObjectDetection.register` or
    `auto_map` added, so it lists ~150 built-in detectors and calls this one unsupported although the pipeline then
    runs it. Only that one message, for this class, is dropped."""

    MESSAGE = "The model 'DiTForObjectDetection' is not supported for object-detection."

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGE)


_pipeline_logger = logging.getLogger("transformers.pipelines.base")
if not any(type(f).__name__ == _PipelineSupportFilter.__name__ for f in _pipeline_logger.filters):  # remote code
    _pipeline_logger.addFilter(_PipelineSupportFilter())  # may import this file again under another module name

# Detectors saved before version 0.2 kept the VAE encoder beside the DiT (`model.vae.`), not inside the backbone.
LEGACY_KEY_MAPPING = {r"^(model\.)?vae\.": r"\1backbone.vae."}


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# exp() of a size delta above this would only make a box many times the image; the cap keeps it finite in bf16.
_MAX_LOG_SCALE = math.log(1000.0)


def update_boxes(reference: torch.Tensor, delta: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply a predicted correction `delta` `[..., 4]` to reference boxes `[..., 4]` (cx, cy, w, h in 0..1).

    "logit" (Deformable DETR): `sigmoid(inverse_sigmoid(reference) + delta)`; a centre moves by about
    `delta * cx * (1 - cx)` whatever the box's size. "relative" (LW-DETR's box reparametrisation): the centre moves by
    `delta * (w, h)` and the size is scaled by `exp(delta)`, so a correction is in units of the box itself, which is
    what small objects need; boxes may leave 0..1 (post-processing clips them)."""
    if mode == "logit":
        return (inverse_sigmoid(reference) + delta).sigmoid()
    size = reference[..., 2:]
    return torch.cat([reference[..., :2] + delta[..., :2] * size,
                      size * delta[..., 2:].clamp(max=_MAX_LOG_SCALE).exp()], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Neck: normalised taps -> simple feature pyramid (ViTDet)
# ----------------------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `[batch, channels, height, width]` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NeckBlock(nn.Module):
    """A residual bottleneck of convolutions on one pyramid level, `[B, C, h, w]` -> `[B, C, h, w]`: 1x1 to C/2,
    3x3, 1x1 back to C, with LayerNorm and GELU between. The simple pyramid's own layers are linear; these add
    non-linear spatial mixing where small objects need it, at about 13 C^2 / 4 multiply-adds per pixel. The last
    convolution starts at zero, so a new block is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 2
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), LayerNorm2d(hidden), nn.GELU())
        self.mix = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), LayerNorm2d(hidden), nn.GELU())
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.mix(self.reduce(x)))


class DiTDetectionNeck(nn.Module):
    """The backbone's feature maps (`[batch, hidden_size, h, w]` each, one per tapped stage) -> `len(pyramid_scales)`
    maps `[batch, d_model, h_l, w_l]`, finest first.

    DiT tokens carry a few channels of huge magnitude; each tap goes through a LayerNorm over its channels first (the
    same normalisation DiT's own blocks apply before reading their input), so no tap or channel dominates the fused
    map. The fused map is then resampled into a simple feature pyramid (ViTDet).
    """

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        hidden, num_taps = config.backbone_config.hidden_size, len(config.backbone_config.out_indices)
        d_model = config.d_model
        self.tap_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-6) for _ in range(num_taps))
        self.fuse = nn.Linear(hidden * num_taps, d_model)
        self.levels = nn.ModuleList(self._make_level(scale, d_model, config.neck_blocks)
                                    for scale in config.pyramid_scales)

    @staticmethod
    def _make_level(scale: float, channels: int, num_blocks: int) -> nn.Sequential:
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
            *(NeckBlock(channels) for _ in range(num_blocks)),
        )

    def forward(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        channels_last = [norm(tap.permute(0, 2, 3, 1)) for norm, tap in zip(self.tap_norms, feature_maps)]
        fused = self.fuse(torch.cat(channels_last, dim=-1)).permute(0, 3, 1, 2)
        return [level(fused) for level in self.levels]


def norm_2d(kind: str, channels: int) -> nn.Module:
    """A normalisation over the channels of `[batch, channels, h, w]` maps: "batch" or "layer"."""
    return nn.BatchNorm2d(channels) if kind == "batch" else LayerNorm2d(channels)


class ConvNormAct(nn.Sequential):
    """Convolution (no bias; `kernel // 2` padding) -> channel normalisation -> activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, norm: str = "batch",
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
                         norm_2d(norm, out_channels), activation())


class CrossStagePartialBlock(nn.Module):
    """YOLOv8's C2f (the block of LW-DETR's projector), `[B, in, h, w]` -> `[B, out, h, w]`: a 1x1 convolution into
    two halves of `out / 2` channels; `num_blocks` pairs of 3x3 convolutions chained on the second half, every
    intermediate kept; all concatenated and merged by a 1x1 convolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm: str):
        super().__init__()
        half = out_channels // 2
        self.split = ConvNormAct(in_channels, 2 * half, 1, norm=norm)
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvNormAct(half, half, 3, norm=norm), ConvNormAct(half, half, 3, norm=norm))
            for _ in range(num_blocks))
        self.merge = ConvNormAct((2 + num_blocks) * half, out_channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.split(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.merge(torch.cat(parts, dim=1))


class CrossStagePartialNeck(nn.Module):
    """LW-DETR's multi-scale projector over the DiT's taps, `neck="c2f"`: the same inputs and outputs as
    [`DiTDetectionNeck`]. For each pyramid level every tap is resampled on its own (x2: a stride-2 transposed
    convolution to half the channels, a quarter above 512 channels after a 1x1 reduction; x0.5: a stride-2 3x3
    convolution), the taps are concatenated and mixed by a [`CrossStagePartialBlock`] with `neck_blocks` blocks, then
    LayerNorm. Each tap is LayerNorm-ed first, as in the simple neck (a pretrained DiT's few huge channels).

    Measured far ahead of the simple pyramid on small, dense objects from scratch, with BatchNorm; with LayerNorm in
    its convolutions it learned no better than the simple pyramid (README "What training compute buys")."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        hidden, num_taps = config.backbone_config.hidden_size, len(config.backbone_config.out_indices)
        self.tap_norms = nn.ModuleList(LayerNorm2d(hidden, eps=1e-6) for _ in range(num_taps))
        self.levels = nn.ModuleList()
        for scale in config.pyramid_scales:
            resamplers, channels = zip(*(self._resampler(scale, hidden, config.neck_norm) for _ in range(num_taps)))
            self.levels.append(nn.ModuleDict({
                "resample": nn.ModuleList(resamplers),
                "mix": CrossStagePartialBlock(sum(channels), config.d_model, config.neck_blocks, config.neck_norm),
                "norm": LayerNorm2d(config.d_model, eps=1e-6),
            }))

    @staticmethod
    def _resampler(scale: float, channels: int, norm: str) -> tuple[nn.Sequential, int]:
        """One tap's resampling to `scale` and the channels it outputs."""
        layers = []
        for _ in range(round(math.log2(scale))):  # x2 steps
            if channels > 512:
                layers.append(ConvNormAct(channels, channels // 2, 1, norm=norm, activation=nn.ReLU))
                channels //= 2
            layers.append(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2))
            channels //= 2
        for _ in range(round(-math.log2(scale))):  # x0.5 steps
            layers.append(ConvNormAct(channels, channels, 3, stride=2, norm=norm, activation=nn.ReLU))
        return nn.Sequential(*layers), channels

    def forward(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        taps = [norm(tap) for norm, tap in zip(self.tap_norms, feature_maps)]
        pyramid = []
        for level in self.levels:
            resampled = torch.cat([resample(tap) for resample, tap in zip(level["resample"], taps)], dim=1)
            pyramid.append(level["norm"](level["mix"](resampled)))
        return pyramid


def neck_channels_last(model: nn.Module) -> None:
    """Keep the necks' convolution weights channels-last, the layout their inputs have (the taps are token
    sequences, channels innermost): with a channels-first weight the CPU convolution converts it on every call, forward
    and backward, which made the C2f neck's forward and backward at DiT-S width 1.15x slower
    (benchmarks/neck_layout.py). Loading replaces parameter objects, and with them the layout, so loaders call this."""
    for module in model.modules():
        if isinstance(module, (DiTDetectionNeck, CrossStagePartialNeck)):
            module.to(memory_format=torch.channels_last)


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
    """Decoder layers with box refinement: layer `l` predicts a correction of its reference boxes (`update_boxes`,
    `config.box_update`). `config.box_refinement="iterative"` (Deformable DETR): the refined boxes (detached) are the
    next layer's references; `"lite"` (LW-DETR): every layer samples around and corrects the proposals' boxes."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__()
        self.d_model = config.d_model
        self.box_update = config.box_update
        self.iterative = config.box_refinement == "iterative"
        self.layers = nn.ModuleList(DiTDetectionDecoderLayer(config) for _ in range(config.decoder_layers))
        self.query_pos_head = MLP(2 * config.d_model, config.d_model, config.d_model, 2)
        self.box_heads = nn.ModuleList(MLP(config.d_model, config.d_model, 4, 3) for _ in range(config.decoder_layers))

    def forward(self, queries, reference_boxes, memory, spatial_shapes, self_attn_mask=None):
        """queries `[B, Q, d]`, reference_boxes `[B, Q, 4]` -> (hidden states `[B, L, Q, d]`, boxes `[B, L, Q, 4]`),
        stacked on dim 1 as in transformers' Deformable DETR, so every output's first axis is the batch."""
        hidden_states, all_hidden, all_boxes = queries, [], []
        query_pos = None
        for layer, box_head in zip(self.layers, self.box_heads):
            if self.iterative or query_pos is None:
                query_pos = self.query_pos_head(sine_box_embedding(reference_boxes, self.d_model))
            hidden_states = layer(hidden_states, query_pos, reference_boxes, memory, spatial_shapes, self_attn_mask)
            boxes = update_boxes(reference_boxes, box_head(hidden_states), self.box_update)
            all_hidden.append(hidden_states)
            all_boxes.append(boxes)
            if self.iterative:
                reference_boxes = boxes.detach()
        return torch.stack(all_hidden, dim=1), torch.stack(all_boxes, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Outputs and models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiTDetectionModelOutput(ModelOutput):
    """
    Names follow transformers' DETR family (Deformable DETR, LW-DETR) where they mean the same thing.

    last_hidden_state (`[batch, queries, d_model]`): the last decoder layer's query states.
    intermediate_hidden_states (`[batch, decoder_layers, queries, d_model]`): every decoder layer's query states.
    intermediate_reference_points (`[batch, decoder_layers, queries, 4]`): every layer's refined boxes, cx, cy, w, h
        in 0..1.
    init_reference_points (`[batch, queries, 4]`): the boxes of the selected pyramid-token proposals that the first
        decoder layer refines.
    enc_outputs_class (`[batch, pyramid tokens, num_labels]`): every pyramid token scored as a proposal (logits).
    enc_outputs_boxes (`[batch, pyramid tokens, 4]`): their boxes, cx, cy, w, h relative to the image (boxes, where
        Deformable DETR returns `enc_outputs_coord_logits` before a sigmoid; with `box_update="relative"` a box may
        reach past 0..1, which post-processing clips). The loss supervises every token (Deformable
        DETR's two-stage encoder loss), so the selection learns from all of them, not only the ones it picked.
    hidden_states (tuple of `[batch, tokens, hidden_size]`): the backbone's embedded tokens and every block's output
        (`num_hidden_layers + 1` entries), when `output_hidden_states=True`.

    In training, `queries = num_queries * num_query_groups`; in eval mode, `num_queries`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    intermediate_hidden_states: torch.FloatTensor | None = None
    intermediate_reference_points: torch.FloatTensor | None = None
    init_reference_points: torch.FloatTensor | None = None
    enc_outputs_class: torch.FloatTensor | None = None
    enc_outputs_boxes: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DiTDetectionObjectDetectionOutput(ModelOutput):
    """
    loss (scalar): weighted sum of the set-prediction losses of every decoder layer and of the proposals.
    loss_dict (`dict[str, scalar]`): the unweighted terms (`loss_class`, `loss_bbox`, `loss_giou`, suffixed by
        `_dec_{i}` for intermediate layers and `_proposals`).
    logits (`[batch, num_queries, num_labels]`): sigmoid classification logits (no background class).
    pred_boxes (`[batch, num_queries, 4]`): boxes as cx, cy, w, h normalised to 0..1 of the input image.
    auxiliary_outputs (list of `{"logits", "pred_boxes"}`): the same for every earlier decoder layer; only when
        `labels` are given (as in transformers' DETRs), so that inference outputs split per image (pipelines).
    init_reference_points, last_hidden_state, hidden_states: see [`DiTDetectionModelOutput`].

    Only the first query group is returned; the training-only groups enter the loss alone.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    auxiliary_outputs: list[dict] | None = None
    init_reference_points: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
        key_mapping = {**LEGACY_KEY_MAPPING, **(kwargs.pop("key_mapping", None) or {})}
        model = super().from_pretrained(*args, key_mapping=key_mapping, **kwargs)
        # transformers would save with the renamings it applied reversed, i.e. in the legacy names: save today's.
        model._weight_conversions = []
        freeze_vae(model)
        neck_channels_last(model)
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
            config_overrides: `DiTDetectionConfig` fields and backbone fields that are not the checkpoint's geometry
                (`out_indices`, `feature_timestep`, `image_size`, `num_queries`, ...). `num_hidden_layers` defaults
                to the deepest tap.

        Needs the installed `modeling_dit_detection` package (the converter is not part of a saved model's code).
        """
        # Imported by name, not relatively: the Hub copy of a model holds only the inference files.
        load_from_diffusers = importlib.import_module("modeling_dit_detection.convert_diffusers_dit").load_from_diffusers
        return load_from_diffusers(cls, name_or_path, vae=vae, id2label=id2label,
                                   fold_conditioning=fold_conditioning, hub_kwargs=hub_kwargs, **config_overrides)

    def fold_conditioning(self) -> None:
        """Replace every backbone block's adaLN MLP by the constant modulation it produces for
        (`feature_timestep`, null class). Outputs stay identical; the backbone loses the MLPs and the
        timestep and class embedders (about a third of DiT-XL/2's weights). `feature_timestep` is then fixed."""
        for module in self.modules():
            if isinstance(module, DiTBackbone):
                module.fold_conditioning()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # transformers treats a module that owns no parameters of its own as initialised when the model is not part of
        # the library (`PreTrainedModel.is_custom_code`), so `_init_weights` never sees e.g. the decoder or the heads'
        # parent: each special case is keyed by the layer whose parameters it sets, found through its owner.
        for owner in self.modules():
            init_dit_layer(owner, module)
            _init_special_layer(owner, module)


def _init_special_layer(owner: nn.Module, layer: nn.Module) -> None:
    """The initialisation `owner` wants for `layer`, if `layer` is one of its special layers (runs after the generic
    init of `layer`, so it overrides it)."""
    if isinstance(owner, NeckBlock):
        if layer is owner.expand:
            _init_zero(layer)
    elif isinstance(owner, MultiScaleDeformableAttention):
        if layer is owner.sampling_offsets:
            init.zeros_(layer.weight)
            init.copy_(layer.bias, _sampling_offset_grid(owner.n_heads, owner.n_levels, owner.n_points))
        elif layer is owner.attention_weights:
            init.zeros_(layer.weight)
            init.zeros_(layer.bias)
        elif layer is owner.value_proj or layer is owner.output_proj:
            init.xavier_uniform_(layer.weight)
            init.zeros_(layer.bias)
    elif isinstance(owner, DiTDetectionDecoder):
        if any(layer is box_head.layers[-1] for box_head in owner.box_heads):
            _init_zero(layer)  # start from "no correction" of the reference boxes
    elif isinstance(owner, DiTDetectionModel):
        if layer is owner.proposal_box_head.layers[-1]:
            _init_zero(layer)  # proposals start at their anchors
        elif layer is owner.proposal_class_head:
            init.constant_(layer.bias, _prior_logit())
    elif isinstance(owner, DiTForObjectDetection):
        if any(layer is head for head in owner.class_heads):
            init.constant_(layer.bias, _prior_logit())


def _init_zero(layer: nn.Linear) -> None:
    init.zeros_(layer.weight)
    init.zeros_(layer.bias)


def _sampling_offset_grid(heads: int, levels: int, points: int) -> torch.Tensor:
    """Bias of the sampling offsets `[heads * levels * points * 2]`: head h samples along its own direction, point p
    at distance p + 1 (a spread-out initial pattern, as Deformable DETR)."""
    angles = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().max(-1, keepdim=True)[0]
    grid = directions[:, None, None, :].repeat(1, levels, points, 1)
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32)[None, None, :, None]
    return grid.flatten()


def _prior_logit(prior: float = 0.01) -> float:
    """Class bias so every class starts at probability `prior`: keeps the focal loss of the many negatives small."""
    return -math.log((1 - prior) / prior)


class DiTDetectionModel(DiTDetectionPreTrainedModel):
    """DiT backbone (with its VAE encoder) + neck + query selection + decoder; no class heads on the queries."""

    def __init__(self, config: DiTDetectionConfig):
        super().__init__(config)
        self.backbone = DiTBackbone(config.backbone_config)
        self.neck = CrossStagePartialNeck(config) if config.neck == "c2f" else DiTDetectionNeck(config)
        d_model = config.d_model
        self.proposal_proj = nn.Linear(d_model, d_model)
        self.proposal_norm = nn.LayerNorm(d_model)
        self.proposal_class_head = nn.Linear(d_model, config.num_labels)
        self.proposal_box_head = MLP(d_model, d_model, 4, 3)
        # Content part of the queries: one learned vector per query and group; positions come from the proposals.
        self.query_embed = nn.Embedding(config.num_queries * config.num_query_groups, d_model)
        self.decoder = DiTDetectionDecoder(config)
        self.post_init()
        neck_channels_last(self)

    def score_tokens(self, memory: torch.Tensor, spatial_shapes: list[tuple[int, int]]):
        """Every pyramid token as an object proposal, a box around an anchor at the token:
        memory `[B, S, d]` -> (logits `[B, S, C]`, boxes `[B, S, 4]` cx, cy, w, h in 0..1)."""
        anchors = _token_anchors(spatial_shapes, self.config.anchor_tokens, memory.device, memory.dtype)  # [S, 4]
        num_queries = self.config.num_queries
        if anchors.shape[0] < num_queries:
            raise ValueError(f"The input gives {anchors.shape[0]} pyramid tokens, fewer than num_queries="
                             f"{num_queries}; use larger images or fewer queries.")
        features = self.proposal_norm(self.proposal_proj(memory))
        logits = self.proposal_class_head(features)
        boxes = update_boxes(anchors, self.proposal_box_head(features), self.config.box_update)
        return logits, boxes

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None) -> DiTDetectionModelOutput:
        """pixel_values `[batch, 3, H, W]` in [-1, 1], H and W multiples of `config.backbone_stride`."""
        config = self.config
        features = self.backbone(pixel_values, output_hidden_states=output_hidden_states)
        pyramid = self.neck(list(features.feature_maps))

        spatial_shapes = [tuple(level.shape[-2:]) for level in pyramid]
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in pyramid], dim=1)
        enc_outputs_class, enc_outputs_boxes = self.score_tokens(memory, spatial_shapes)
        # The best-scoring tokens' boxes become the queries' reference boxes.
        top = enc_outputs_class.max(-1).values.topk(config.num_queries, dim=1).indices
        init_reference_points = enc_outputs_boxes.gather(1, top[..., None].expand(-1, -1, 4))

        num_groups = config.num_query_groups if self.training else 1
        batch = pixel_values.shape[0]
        queries = self.query_embed.weight[: config.num_queries * num_groups][None].expand(batch, -1, -1)
        reference_boxes = init_reference_points.detach().repeat(1, num_groups, 1)
        hidden, boxes = self.decoder(queries, reference_boxes, memory, spatial_shapes,
                                     _group_attention_mask(config.num_queries, num_groups, memory.device))

        return DiTDetectionModelOutput(
            last_hidden_state=hidden[:, -1],
            intermediate_hidden_states=hidden,
            intermediate_reference_points=boxes,
            init_reference_points=init_reference_points,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_boxes=enc_outputs_boxes,
            hidden_states=features.hidden_states,
        )


def _token_anchors(spatial_shapes: list[tuple[int, int]], anchor_tokens: float | None, device,
                   dtype) -> torch.Tensor:
    """One anchor per pyramid token, `[S, 4]` cx, cy, w, h in 0..1: centred on the token, `anchor_tokens` tokens of
    its level wide and high (`None`: a square of 0.05 * 2^level of the image)."""
    anchors = []
    for level, (height, width) in enumerate(spatial_shapes):
        cy, cx = torch.meshgrid((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height,
                                (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width, indexing="ij")
        if anchor_tokens is None:
            w = h = torch.full_like(cx, 0.05 * 2.0**level)
        else:
            w, h = torch.full_like(cx, anchor_tokens / width), torch.full_like(cx, anchor_tokens / height)
        anchors.append(torch.stack([cx, cy, w, h], -1).flatten(0, 1))
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
        hidden, boxes = outputs.intermediate_hidden_states, outputs.intermediate_reference_points  # [B, L, Q, .]
        logits = [head(hidden[:, layer]) for layer, head in enumerate(self.class_heads)]
        boxes = list(boxes.unbind(1))

        loss = loss_dict = auxiliary_outputs = None
        num_queries = self.config.num_queries  # the first group is the inference group
        if labels is not None:
            loss, loss_dict = self.compute_loss(logits, boxes, outputs.enc_outputs_class, outputs.enc_outputs_boxes,
                                                labels)
            auxiliary_outputs = [{"logits": layer_logits[:, :num_queries], "pred_boxes": layer_boxes[:, :num_queries]}
                                 for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])]
        return DiTDetectionObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits[-1][:, :num_queries],
            pred_boxes=boxes[-1][:, :num_queries],
            auxiliary_outputs=auxiliary_outputs,
            init_reference_points=outputs.init_reference_points,
            last_hidden_state=outputs.last_hidden_state[:, :num_queries],
            hidden_states=outputs.hidden_states,
        )

    def compute_loss(self, logits, boxes, enc_outputs_class, enc_outputs_boxes, labels):
        """Set-prediction loss of every decoder layer (all query groups) and of every pyramid token's proposal.
        logits / boxes: per decoder layer `[B, G*Q, C]` / `[B, G*Q, 4]`; enc_outputs_*: `[B, S, C]` / `[B, S, 4]`."""
        config = self.config
        device = enc_outputs_class.device
        labels = [{key: value.to(device) if torch.is_tensor(value) else value for key, value in target.items()}
                  for target in labels]
        num_groups = logits[-1].shape[1] // config.num_queries
        predictions = [SetPredictions("", logits[-1], boxes[-1], num_groups)]
        predictions += [SetPredictions(f"dec_{i}", layer_logits, layer_boxes, num_groups)
                        for i, (layer_logits, layer_boxes) in enumerate(zip(logits[:-1], boxes[:-1]))]
        predictions.append(SetPredictions("proposals", enc_outputs_class, enc_outputs_boxes, 1))
        matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost,
                                   config.focal_alpha, config.focal_gamma)
        criterion = DiTDetectionCriterion(matcher, config.class_loss_coefficient, config.bbox_loss_coefficient,
                                          config.giou_loss_coefficient, config.focal_alpha, config.focal_gamma,
                                          config.class_loss)
        return criterion(predictions, labels)


__all__ = ["DiTDetectionModel", "DiTDetectionModelOutput", "DiTDetectionObjectDetectionOutput",
           "DiTDetectionPreTrainedModel", "DiTForObjectDetection"]
