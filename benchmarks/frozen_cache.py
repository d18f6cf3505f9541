"""Stage-one epoch time with and without the frozen-feature cache (`--cache_frozen_features`), random weights.

    python benchmarks/frozen_cache.py [--geometry S-vae64|tiny-latent|XL-256] [--images 16] [--batch-size 8]
                                      [--epochs 4] [--repeats 3] [--device cpu|cuda] [--bf16] [--json out.json]

Stage one as run_detection.py runs it: the backbone frozen (`set_trainable`), the neck and head trained (forward
with the loss on random boxes, backward, AdamW step), flip-only augmentation as run_detection.py's "flip" (`mirrored_in_epoch`): each image,
with its boxes, mirrored in every other epoch, so epochs 1 and 2 miss every image and epochs from 3 on hit all. "with cache": a `FrozenFeatureCache` (RAM) stands in for the backbone from the first epoch on, so
epoch 1 pays every miss plus the hashing and copies. Epoch times (CPU-seconds of the process on a CPU, wall
seconds on a GPU) are medians (min-max) over `--repeats` rounds; each
round trains both modes from the same initial weights, in alternating order (A B, B A, ...), after one warm-up step
each on an extra batch that is never cached.

Geometries (pretrained DiT shapes with random weights, all taps at DiT's default 1/2, 5/8, 3/4 depth, blocks up to
the deepest tap built as the converter does, the "small" preset's head unless said):
- "S-vae64" (default, CPU): DiT-S/2 width (384, 6 heads, patch 2, depth 12: 9 blocks built) on the latents of the
  SD VAE encoder (diffusers' config of stabilityai/sd-vae-ft-ema, 4 down blocks, ~34 M parameters) at 64x64 pixels:
  8x8 latents, 4x4 tokens. The VAE dominates the frozen forward, as in the real job (~8.5 GMAC per 64x64 image).
- "tiny-latent": the test preset (tiny VAE, 32x32): seconds, to check the script.
- "XL-256" (GPU): DiT-XL/2-256 with the SD VAE and the default detector head (`DiTDetectionConfig()`, 22 blocks
  built), 256x256: the real job's geometry.
Memory: the cache's bytes per input (taps x hidden x tokens x element size), and in all after the last epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch

from matcher_share import random_labels
from throughput import process_clock
from modeling_dit_detection import DiTDetectionConfig, DiTForObjectDetection, default_out_indices
from modeling_dit_detection.configuration_dit_backbone import SD_VAE_CONFIG
from modeling_dit_detection.training.data import mirrored_in_epoch
from modeling_dit_detection.training.feature_cache import install_feature_cache, remove_feature_cache
from modeling_dit_detection.training.stages import set_trainable

NUM_LABELS = 5
S_TAPS = default_out_indices(12)  # (6, 8, 9)
XL_TAPS = default_out_indices(28)


def geometry_config(name: str) -> DiTDetectionConfig:
    id2label = {i: str(i) for i in range(NUM_LABELS)}
    if name == "tiny-latent":
        return DiTDetectionConfig.from_preset("tiny-latent", id2label=id2label)
    if name == "S-vae64":
        return DiTDetectionConfig.from_preset(
            "small", id2label=id2label, hidden_size=384, num_attention_heads=6, patch_size=2, in_channels=4,
            num_hidden_layers=S_TAPS[-1], out_indices=S_TAPS, vae_config=SD_VAE_CONFIG, image_size=(64, 64),
            num_class_embeds=1000, frequency_embedding_size=256, feature_timestep=100)
    if name == "XL-256":
        return DiTDetectionConfig.from_preset("DiT-XL/2", id2label=id2label, num_hidden_layers=XL_TAPS[-1],
                                              out_indices=XL_TAPS)
    raise ValueError(f"unknown geometry {name!r}")


def make_data(config, images: int, device) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(images, 3, *config.image_size, generator=generator) * 2 - 1
    return pixels.to(device), random_labels(images, NUM_LABELS, generator)


def epoch_batches(pixels, labels, epoch: int, batch_size: int):
    """The epoch's batches: a seeded shuffle, each image flipped (pixels and boxes) by its coin."""
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(epoch)).tolist()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch, targets = [], []
        for i in rows:
            target = {k: v.to(pixels.device) for k, v in labels[i].items()}
            if mirrored_in_epoch(0, i, epoch):
                batch.append(pixels[i].flip(-1))
                boxes = target["boxes"].clone()
                boxes[:, 0] = 1 - boxes[:, 0]
                target["boxes"] = boxes
            else:
                batch.append(pixels[i])
            targets.append(target)
        yield torch.stack(batch), targets


def train_step(model, optimizer, pixels, labels, bf16: bool) -> None:
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage_one(model, initial, pixels, labels, args, cached: bool) -> dict:
    """One stage-one run of `args.epochs` epochs from `initial` weights; per-epoch seconds and cache counts."""
    device = pixels.device
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    warmup_pixels = torch.rand_like(pixels[:args.batch_size]) * 2 - 1  # never cached: the cache is not in place yet
    train_step(model, optimizer, warmup_pixels, labels[:args.batch_size], args.bf16)
    model.load_state_dict(initial)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cache = install_feature_cache(model) if cached else None
    seconds, counts = [], []
    clock = process_clock(device)
    try:
        for epoch in range(args.epochs):
            synchronize(device)
            started = clock()
            for batch, targets in epoch_batches(pixels, labels, epoch, args.batch_size):
                train_step(model, optimizer, batch, targets, args.bf16)
            synchronize(device)
            seconds.append(clock() - started)
            counts.append(cache.take_counts("train") if cache else None)
        result = {"seconds": seconds, "counts": counts}
        if cache:
            result.update(entries=len(cache.store), bytes=cache.store.nbytes)
        return result
    finally:
        if cache:
            remove_feature_cache(model)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(runs: dict[str, list[dict]], epochs: int) -> str:
    lines = ["| epoch | without cache (s) | with cache (s) | speed-up | cache hits / misses |", "|---|---|---|---|---|"]
    # seconds: CPU-seconds on a CPU, wall seconds on a GPU (`throughput.process_clock`)
    for epoch in range(epochs):
        plain = [run["seconds"][epoch] for run in runs["plain"]]
        cached = [run["seconds"][epoch] for run in runs["cached"]]
        hits, misses = runs["cached"][-1]["counts"][epoch]
        lines.append(f"| {epoch + 1} | {spread(plain)} | {spread(cached)} | "
                     f"{statistics.median(plain) / statistics.median(cached):.2f}x | {hits} / {misses} |")
    plain = [sum(run["seconds"]) for run in runs["plain"]]
    cached = [sum(run["seconds"]) for run in runs["cached"]]
    hits = sum(counts[0] for counts in runs["cached"][-1]["counts"])
    misses = sum(counts[1] for counts in runs["cached"][-1]["counts"])
    lines.append(f"| all {epochs} | {spread(plain)} | {spread(cached)} | "
                 f"{statistics.median(plain) / statistics.median(cached):.2f}x | {hits} / {misses} |")
    return "\n".join(lines)


def describe(config: DiTDetectionConfig) -> str:
    dit = config.backbone_config
    vae = (f"VAE encoder with blocks {dit.vae_config['block_out_channels']}" if dit.vae_config else "pixel space")
    height, width = config.image_size
    return (f"DiT hidden {dit.hidden_size}, {dit.num_hidden_layers} blocks built, {dit.num_attention_heads} heads, "
            f"patch {dit.patch_size}, taps {list(dit.out_indices)}, {vae}, input {height}x{width} (stride "
            f"{dit.backbone_stride}); head d_model {config.d_model}, {config.num_queries} queries")


def machine(device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return f"{device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=["S-vae64", "tiny-latent", "XL-256"], default="S-vae64")
    parser.add_argument("--images", type=int, default=16, help="training images (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="forward under torch.autocast(bfloat16)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = geometry_config(args.geometry)
    with device:  # initialised where it runs: DiT-XL/2 with the VAE inits in seconds on a GPU
        model = DiTForObjectDetection(config).to(device)
    set_trainable(model, train_backbone=False)  # stage one
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    pixels, labels = make_data(config, args.images, device)
    print(f"{machine(device)} | load average {os.getloadavg()[0]:.2f} at start", flush=True)
    print(f"geometry {args.geometry}: {describe(config)}", flush=True)

    runs = {"plain": [], "cached": []}
    for repeat in range(args.repeats):
        for mode in (("plain", "cached") if repeat % 2 == 0 else ("cached", "plain")):
            runs[mode].append(run_stage_one(model, initial, pixels, labels, args, cached=mode == "cached"))
            print(f"  round {repeat + 1} {mode}: " + ", ".join(f"{s:.2f}" for s in runs[mode][-1]["seconds"]) + " s",
                  flush=True)

    last = runs["cached"][-1]
    per_input = last["bytes"] / max(last["entries"], 1)
    unit = "CPU-seconds" if device.type == "cpu" else "wall seconds"
    print(f"\n{args.images} images, batch {args.batch_size}, flip-only augmentation, times in {unit}, "
          f"{'bfloat16 autocast' if args.bf16 else 'float32'}; median (min-max) of {args.repeats} rounds, modes "
          "alternating\n")
    print(table(runs, args.epochs))
    print(f"\ncache after {args.epochs} epochs: {last['entries']} inputs ((image, flip) pairs), "
          f"{last['bytes'] / 2**20:.2f} MiB in RAM, {per_input / 2**10:.1f} KiB per input "
          f"({len(config.backbone_config.out_indices)} taps x {config.backbone_config.hidden_size} x tokens x "
          f"element size); at most 2 inputs per image")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    result = {"machine": machine(device), "args": vars(args), "geometry": describe(config), "runs": runs,
              "cache_bytes_per_input": per_input}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
