"""Diffusion pretraining of a diffusers `DiTTransformer2DModel`: the pieces `pretrain_dit.py` is made of.

- `new_dit_transformer`: a DiT of a size preset, initialised as the DiT paper does (adaLN-Zero), with one
  conditioning embedder shared by all blocks (`tie_conditioning_embedders`), as the original DiT has it and as the
  detector's converter requires (diffusers gives every block its own copy; trained untied, the copies would drift).
- `noise_scheduler`: diffusers' `DDPMScheduler` with the DiT paper's schedule (linear betas 1e-4 .. 0.02, 1000 steps,
  epsilon prediction).
- `DiffusionLoss`: the DiT paper's loss: the epsilon MSE (L_simple) plus, for a DiT that learns its variance, the
  variational bound term (L_vlb) that trains only the variance, as improved DDPM's hybrid loss.
- `sample_images`: samples for a person to look at, ancestral DDPM with the saved scheduler: diffusers' `DiTPipeline`
  for a latent DiT, the same loop written out in pixel space (`DiTPipeline` always decodes with a VAE).
- `draw_loss_curve`, `image_grid`: the PNGs, drawn with PIL (no plotting library needed).

Training side only: never imported by the inference files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ..configuration_dit_backbone import DIT_PRESETS, DiTBackboneConfig
from ..configuration_dit_detection import DETECTOR_PRESETS, PRESETS, DiTDetectionConfig

# The DiT paper's noise schedule (Peebles & Xie 2023, following ADM): linear betas, 1000 steps, epsilon prediction.
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                "prediction_type": "epsilon"}


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

def preset_backbone(preset: str) -> DiTBackboneConfig:
    """The backbone geometry of a preset: a DiT of the paper ("DiT-S/2" ... "DiT-XL/2": latent, SD VAE, 256 px) or
    the backbone of a small detector ("small": run_detection.py's built-in scratch detector, pixel space, 64 px;
    "tiny", "tiny-latent"). An unknown name is a `ValueError` listing the presets."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown --model_preset {preset!r}; choose one of {list(PRESETS)}.")
    if preset in DIT_PRESETS:
        return DiTBackboneConfig.from_preset(preset)
    return DiTDetectionConfig.from_preset(preset).backbone_config


def new_dit_transformer(backbone: DiTBackboneConfig, sample_size: int, in_channels: int, learn_sigma: bool):
    """A randomly initialised diffusers `DiTTransformer2DModel` of `backbone`'s geometry on a `sample_size` grid of
    `in_channels` (pixels: 3, or the VAE's latent channels); `2 * in_channels` outputs when it `learn_sigma`s.
    Class conditioning keeps the preset's `num_class_embeds`; the null class (`num_class_embeds`) is the one used."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=backbone.num_attention_heads, attention_head_dim=backbone.head_dim,
        in_channels=in_channels, out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=backbone.num_hidden_layers, sample_size=sample_size, patch_size=backbone.patch_size,
        num_embeds_ada_norm=backbone.num_class_embeds)
    tie_conditioning_embedders(transformer, check_equal=False)
    initialize_like_dit(transformer)
    return transformer


@torch.no_grad()
def initialize_like_dit(transformer) -> None:
    """The DiT paper's initialisation (its `initialize_weights`): Xavier-uniform linear layers and patch embedding
    (as a linear layer), N(0, 0.02) timestep MLP and class table, and adaLN-Zero: every block's modulation and the
    final layer start at zero, so each block starts as the identity and the model predicts zero noise."""
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = transformer.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    embedder = transformer.transformer_blocks[0].norm1.emb
    nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
    for block in transformer.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def tie_conditioning_embedders(transformer, check_equal: bool = True) -> None:
    """Make every block use block 0's timestep and class embedder (one module, shared parameters), as the original
    DiT has one embedder and diffusers only copies it into each block. `check_equal`: a checkpoint whose copies
    differ cannot be represented by one embedder (nor loaded by the detector's converter): `ValueError`."""
    first = transformer.transformer_blocks[0].norm1.emb
    reference = first.state_dict()
    for index, block in enumerate(transformer.transformer_blocks[1:], start=1):
        if check_equal:
            for key, value in block.norm1.emb.state_dict().items():
                if not torch.equal(value, reference[key]):
                    raise ValueError(f"transformer_blocks.{index}.norm1.emb.{key} differs from block 0's copy: this "
                                     "DiT has a separate conditioning embedder per block, which neither this script "
                                     "nor the detector's converter can represent.")
        block.norm1.emb = first


def untied_copy(transformer):
    """A new `DiTTransformer2DModel` with `transformer`'s config and a copy of its weights, each block holding its own
    copy of the (shared) conditioning embedder: diffusers' layout, which safetensors can save (it refuses tensors
    that share memory) and which `DiTTransformer2DModel.from_pretrained` and the converter read."""
    from diffusers import DiTTransformer2DModel

    copy = DiTTransformer2DModel.from_config(transformer.config)
    copy.load_state_dict({key: value.detach().clone() for key, value in transformer.state_dict().items()})
    return copy.eval()


def learns_sigma(transformer) -> bool:
    """Whether the DiT predicts its variance too (`out_channels = 2 * in_channels`, the DiT paper's models)."""
    config = transformer.config
    out_channels = config.out_channels if config.out_channels is not None else config.in_channels
    return out_channels == 2 * config.in_channels


def noise_scheduler(pixel_space: bool):
    """diffusers' `DDPMScheduler` with the DiT paper's schedule: it noises the training images, and it is the
    scheduler saved with the pipeline and used for the samples. Its variance is the fixed posterior variance
    ("fixed_small"): diffusers' `DiTPipeline` drops a DiT's variance output before `scheduler.step`, so a
    "learned_range" scheduler could not run in it. `clip_sample` (of the predicted clean image to [-1, 1]) only in
    pixel space, where the data lies in [-1, 1] (latents do not)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DIT_SCHEDULE, variance_type="fixed_small", clip_sample=pixel_space)


# ----------------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------------

class DiffusionLoss(nn.Module):
    """The DiT paper's training loss per sample, `[batch]`.

    `model_output` `[B, C, H, W]` (epsilon) or `[B, 2C, H, W]` (epsilon, then the variance interpolation v in
    [-1, 1] of improved DDPM: log variance = (v + 1) / 2 * log(beta_t) + (1 - v) / 2 * log(posterior variance)).

    - L_simple: mean squared error of the predicted noise, averaged over C, H, W.
    - L_vlb (only with a variance output): the variational bound term of step t in bits per dimension: the KL
      divergence of the true posterior q(x_{t-1} | x_t, x_0) from the model's p(x_{t-1} | x_t), and at t = 0 the
      negative log-likelihood of x_0 under a Gaussian discretised to 256 levels in [-1, 1]. The model mean is built
      from the predicted noise with its gradient stopped, so L_vlb trains only the variance (improved DDPM's hybrid
      loss; in DiT's code the weight of L_vlb is 1, `num_timesteps / 1000` with 1000 steps).
    """

    def __init__(self, scheduler):
        super().__init__()
        betas = scheduler.betas.to(torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to step 1's value, as improved DDPM does.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        tables = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_mean_coef_x0": betas * previous.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef_xt": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "posterior_log_variance": clipped.log(),
            "log_betas": betas.log(),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    def _at(self, name: str, timesteps: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(timesteps.device)[timesteps][:, None, None, None]

    def forward(self, model_output: torch.Tensor, x0: torch.Tensor, noisy: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """model_output `[B, C or 2C, H, W]`; x0, noisy (x_t), noise `[B, C, H, W]`; timesteps `[B]` int ->
        loss `[B]` (L_simple + L_vlb)."""
        model_output = model_output.float()
        channels = x0.shape[1]
        predicted_noise = model_output[:, :channels]
        loss = (predicted_noise - noise).pow(2).mean(dim=(1, 2, 3))
        if model_output.shape[1] == channels:
            return loss
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"The model output has {model_output.shape[1]} channels; expected {channels} (noise) or "
                             f"{2 * channels} (noise and variance).")
        return loss + self.variational_bound(predicted_noise.detach(), model_output[:, channels:], x0.float(),
                                             noisy.float(), timesteps)

    def variational_bound(self, predicted_noise, variance_values, x0, noisy, timesteps) -> torch.Tensor:
        """L_vlb `[B]` in bits per dimension (class docstring)."""
        predicted_x0 = (noisy - self._at("sqrt_one_minus_alphas_cumprod", timesteps) * predicted_noise) \
            / self._at("sqrt_alphas_cumprod", timesteps)
        coef_x0, coef_xt = self._at("posterior_mean_coef_x0", timesteps), self._at("posterior_mean_coef_xt", timesteps)
        true_mean, model_mean = coef_x0 * x0 + coef_xt * noisy, coef_x0 * predicted_x0 + coef_xt * noisy
        true_log_variance = self._at("posterior_log_variance", timesteps)
        fraction = (variance_values + 1) / 2
        model_log_variance = fraction * self._at("log_betas", timesteps) + (1 - fraction) * true_log_variance
        kl = gaussian_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=(1, 2, 3))
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
        return torch.where(timesteps == 0, nll, kl) / math.log(2.0)


def gaussian_kl(mean_1, log_variance_1, mean_2, log_variance_2) -> torch.Tensor:
    """KL(N(mean_1, exp(log_variance_1)) || N(mean_2, exp(log_variance_2))), elementwise, in nats."""
    return 0.5 * (log_variance_2 - log_variance_1 - 1.0 + torch.exp(log_variance_1 - log_variance_2)
                  + (mean_1 - mean_2).pow(2) * torch.exp(-log_variance_2))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(x) elementwise (nats) for x in [-1, 1] quantised to 256 levels (bins of width 2/255), under
    N(mean, exp(log_scale)^2); the outermost bins extend to -inf and +inf."""
    centered = x - mean
    inverse_scale = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inverse_scale * (centered + 1.0 / 255))
    cdf_min = _standard_normal_cdf(inverse_scale * (centered - 1.0 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(transformer, vae, scheduler_config, num_images: int, num_inference_steps: int = 100,
                  seed: int = 0, batch_size: int = 16) -> list[Image.Image]:
    """`num_images` unconditional samples (null class, no guidance) by ancestral DDPM sampling over
    `num_inference_steps` of the schedule in `scheduler_config` (the pipeline's `DDPMScheduler`), deterministic for
    `seed`. A latent DiT goes through diffusers' `DiTPipeline` (which decodes with `vae`); a pixel-space one (`vae`
    None) through the same loop written out here, since `DiTPipeline` always decodes with a VAE. As `DiTPipeline`
    does, a DiT's variance output is dropped and the scheduler's fixed variance is used.

    Why DDPM and not DDIM: DDIM (eta 0) turns the small pixel-space DiT of the built-in job into per-pixel speckle
    after 400 steps of training, where ancestral DDPM gives coherent colour fields (measured; the DiT paper samples
    with 250 DDPM steps too)."""
    from diffusers import DDPMScheduler, DiTPipeline

    scheduler = DDPMScheduler.from_config(scheduler_config)
    null_class = transformer.config.num_embeds_ada_norm
    transformer = transformer.eval()
    images = []
    if vae is not None:
        pipeline = DiTPipeline(transformer=transformer, vae=vae.eval(), scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        with torch.random.fork_rng(devices=[]):  # the pipeline's step noise comes from the global generator
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                images += pipeline(class_labels=[null_class] * count, guidance_scale=1.0, generator=generator,
                                   num_inference_steps=num_inference_steps).images
        return images
    generator = torch.Generator().manual_seed(seed)
    parameter = next(transformer.parameters())
    channels, size = transformer.config.in_channels, transformer.config.sample_size
    scheduler.set_timesteps(num_inference_steps)
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        sample = torch.randn((count, channels, size, size), generator=generator).to(parameter.device, parameter.dtype)
        labels = torch.full((count,), null_class, device=parameter.device)
        for timestep in scheduler.timesteps:
            output = transformer(sample, timestep=timestep.expand(count).to(parameter.device),
                                 class_labels=labels).sample
            sample = scheduler.step(output[:, :channels], timestep, sample, generator=generator).prev_sample
        pixels = ((sample.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        images += [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
    return images


def image_grid(images: list[Image.Image], columns: int = 4, tile: int | None = None, padding: int = 2) -> Image.Image:
    """Images tiled `columns` wide on white, each scaled (nearest neighbour) to `tile` pixels a side (default: as is,
    but at least 128 so small samples can be seen)."""
    if not images:
        raise ValueError("No images to tile.")
    tile = tile or max(128, images[0].width)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (tile + padding) + padding, rows * (tile + padding) + padding), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST),
                   (padding + column * (tile + padding), padding + row * (tile + padding)))
    return grid


def smoothed(values: list[float], window: int) -> list[float]:
    """Centred moving mean over `window` values (fewer at the ends), so that it does not lag the curve."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    half = window // 2
    out = []
    for index in range(len(values)):
        low, high = max(0, index - half), min(len(values), index + half + 1)
        out.append((prefix[high] - prefix[low]) / (high - low))
    return out


def draw_loss_curve(steps: list[int], losses: list[float], title: str = "training loss",
                    size: tuple[int, int] = (800, 480)) -> Image.Image:
    """A loss curve: the loss of every step (light) and its centred mean over about 5 % of the steps (dark) against
    the step, on a log axis when the loss spans more than a factor of 10, with labelled ticks."""
    if not losses:
        raise ValueError("No losses to draw.")
    width, height = size
    left, right, top, bottom = 70, 20, 36, 46
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = [value for value in losses if math.isfinite(value) and value > 0] or [1.0]
    low, high = min(finite), max(finite)
    log_axis = high / low > 10
    transform = math.log10 if log_axis else (lambda v: v)
    y_low, y_high = transform(low), transform(high)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_low, x_high = min(steps), max(max(steps), min(steps) + 1)

    def point(step, value):
        x = left + (step - x_low) / (x_high - x_low) * (width - left - right)
        y = top + (y_high - transform(min(max(value, low), high))) / (y_high - y_low) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _ticks(y_low, y_high, log_axis):
        _, y = point(x_low, 10 ** tick if log_axis else tick)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left + 1, y, width - right - 1, y], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{10 ** tick if log_axis else tick:.3g}", fill="black", font=font)
    for tick in _ticks(x_low, x_high, False):
        x, _ = point(tick, low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{tick:g}", fill="black", font=font)
    window = max(1, len(losses) // 20)
    for series, colour, line in ((losses, (160, 190, 230), 1), (smoothed(losses, window), (20, 60, 160), 2)):
        draw.line([point(s, v) for s, v in zip(steps, series) if math.isfinite(v)], fill=colour, width=line)
    draw.text((left, 10), f"{title} (light: per step; dark: centred mean of {window} steps)"
              f"{'; log scale' if log_axis else ''}", fill="black", font=font)
    draw.text(((width - left) // 2 + left - 15, height - 18), "step", fill="black", font=font)
    return image


def _ticks(low: float, high: float, log_axis: bool) -> list[float]:
    """About 5 round tick positions in [low, high]; on a log axis (low and high are log10 values) the log10 of 1, 2
    and 5 times the powers of ten in range, or of the powers alone where those are many."""
    if log_axis:
        decades = range(math.floor(low), math.ceil(high) + 1)
        factors = (1, 2, 5) if high - low < 3 else (1,)
        ticks = [decade + math.log10(f) for decade in decades for f in factors]
        return [t for t in ticks if low - 1e-9 <= t <= high + 1e-9] or [low, high]
    span = high - low
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= 6:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


__all__ = ["DIT_SCHEDULE", "DiffusionLoss", "discretized_gaussian_log_likelihood", "draw_loss_curve",
           "gaussian_kl", "image_grid", "initialize_like_dit", "learns_sigma", "new_dit_transformer",
           "noise_scheduler", "preset_backbone", "sample_images", "smoothed", "tie_conditioning_embedders",
           "untied_copy"]
