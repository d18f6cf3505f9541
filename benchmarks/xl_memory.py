"""Peak memory and time of one training step of the DiT-XL/2 detector at its real geometry (random weights), and the
largest batch that fits a GPU of a given size.

    python benchmarks/xl_memory.py [--preset DiT-XL/2] [--image_size 256] [--batch_sizes 1,2] [--device cpu|cuda] [--gpu_gib 80]
                                   [--variants all|NAME,NAME] [--json out.json]

The model is `DiTDetectionConfig.from_preset("DiT-XL/2")` as `from_diffusers` builds it from facebook/DiT-XL-2-256:
DiT-XL/2 (hidden 1152) tapped at blocks 14, 18, 21 with the 7 blocks after the deepest tap dropped, on the SD VAE
encoder, the default detection head (d_model 256, 300 queries, 13 query groups in training), 80 classes. A step is what the
Trainer does: forward with the loss on 4 boxes per image, backward, AdamW step; the second step is timed and
measured (the first allocates the optimiser state). Variants:

- stage two (the DiT trains; the memory-heavy stage) with each combination of `fold` (`fold_conditioning()`: the
  adaLN MLPs replaced by their constant output, `run_detection.py --fold_conditioning`), `ckpt` (gradient
  checkpointing of the DiT blocks, `--gradient_checkpointing true`) and `bf16` (autocast, `--bf16 true`);
- stage one (frozen DiT and VAE), plain and folded.

Each (variant, batch size) runs in its own process. Memory on CPU is the process's peak resident set (ru_maxrss:
weights, gradients, AdamW state, activations, and the Python/torch runtime); on CUDA `max_memory_allocated`. From two
batch sizes: per-image memory = the difference of the peaks / the difference of the batch sizes; fixed memory = the
peak at the smallest batch minus its images. The largest batch for `--gpu_gib` is (gpu_gib - fixed) / per-image; the
512x512 column scales per-image memory by the token count (4x at 512 vs 256: activations grow linearly in tokens
when attention is computed without materialising the token x token matrix, as SDPA's flash and memory-efficient
kernels do on a GPU), an estimate, not a measurement. On a CPU the peaks include the runtime and the allocator's
slack, so they over- rather than under-state what a GPU needs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

NUM_LABELS = 80
GIB = 2**30


@dataclass(frozen=True)
class Variant:
    stage: int
    fold: bool
    checkpointing: bool
    bf16: bool

    @property
    def name(self) -> str:
        flags = [flag for flag, on in (("fold", self.fold), ("ckpt", self.checkpointing), ("bf16", self.bf16)) if on]
        return f"stage{self.stage}" + "".join(f"+{flag}" for flag in flags)


VARIANTS = [Variant(2, fold, ckpt, bf16) for fold, ckpt, bf16 in itertools.product((False, True), repeat=3)] + [
    Variant(1, False, False, False), Variant(1, True, False, False)]


def labels_for(batch: int, generator) -> list[dict]:
    """4 boxes per image (cx, cy, w, h normalised), random classes."""
    import torch

    size = 0.05 + 0.3 * torch.rand(batch, 4, 2, generator=generator)
    center = size / 2 + (1 - size) * torch.rand(batch, 4, 2, generator=generator)
    return [{"class_labels": torch.randint(0, NUM_LABELS, (4,), generator=generator),
             "boxes": torch.cat([center[i], size[i]], dim=1)} for i in range(batch)]


def measure(variant: Variant, batch: int, image_size: int, device_name: str, preset: str = "DiT-XL/2") -> dict:
    """One process: build the model, run two training steps, report the second one."""
    import torch

    from modeling_dit_detection import DIT_PRESETS, DiTDetectionConfig, DiTForObjectDetection, default_out_indices
    from modeling_dit_detection.training.stages import set_trainable

    device = torch.device(device_name)
    torch.manual_seed(0)
    geometry = {}
    if preset in DIT_PRESETS:  # as `from_diffusers` builds it: the blocks after the deepest tap are dropped
        taps = default_out_indices(DIT_PRESETS[preset]["num_hidden_layers"])
        geometry = {"out_indices": taps, "num_hidden_layers": max(taps)}
    config = DiTDetectionConfig.from_preset(preset, id2label={i: str(i) for i in range(NUM_LABELS)},
                                            image_size=(image_size, image_size), **geometry)
    model = DiTForObjectDetection(config)
    if variant.fold:
        model.fold_conditioning()
    if variant.checkpointing:
        model.gradient_checkpointing_enable()
    set_trainable(model, train_backbone=variant.stage == 2)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, image_size, image_size, generator=generator) * 2 - 1).to(device)
    labels = [{key: value.to(device) for key, value in image.items()} for image in labels_for(batch, generator)]
    seconds = 0.0
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{variant.name}: non-finite loss {loss.item()}")
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {"variant": variant.name, **asdict(variant), "batch": batch, "image_size": image_size,
            "step_seconds": seconds, "peak_gib": peak / GIB, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in trainable)}


def largest_batches(rows: list[dict], gpu_gib: float) -> dict:
    """Per variant: per-image and fixed memory from its two smallest batch sizes, the largest batch at 256-equivalent
    tokens of the measured size and at 4x the tokens."""
    fits = {}
    for name in dict.fromkeys(row["variant"] for row in rows):
        measured = sorted((row["batch"], row["peak_gib"]) for row in rows if row["variant"] == name)
        if len(measured) < 2:
            continue
        (b1, m1), (b2, m2) = measured[:2]
        per_image = max((m2 - m1) / (b2 - b1), 1e-9)
        fixed = m1 - b1 * per_image
        fits[name] = {"per_image_gib": per_image, "fixed_gib": fixed,
                      "largest_batch": int((gpu_gib - fixed) // per_image),
                      "largest_batch_4x_tokens": int((gpu_gib - fixed) // (4 * per_image))}
    return fits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="DiT-XL/2", help="another size to check the script, e.g. tiny-latent")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_sizes", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu_gib", type=float, default=80.0)
    parser.add_argument("--variants", default="all", help=f"'all' or names from {[v.name for v in VARIANTS]}")
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(Variant(**spec["variant"]), spec["batch"], args.image_size, args.device,
                                 args.preset)))
        return

    variants = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v.name in args.variants.split(",")]
    if not variants:
        parser.error(f"no variant matches {args.variants!r}; choose from {[v.name for v in VARIANTS]}")
    rows = []
    for variant in variants:
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            spec = json.dumps({"variant": asdict(variant), "batch": batch})
            child = subprocess.run([sys.executable, __file__, "--child", spec, "--image_size", str(args.image_size),
                                    "--device", args.device, "--preset", args.preset], capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{variant.name} batch {batch} failed:\n{child.stderr[-3000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{variant.name} batch {batch}: {rows[-1]['step_seconds']:.1f} s, {rows[-1]['peak_gib']:.2f} GiB",
                  file=sys.stderr, flush=True)
    fits = largest_batches(rows, args.gpu_gib)

    print(f"\n{args.preset} detector, {args.image_size}x{args.image_size}, {args.device}; "
          f"{rows[0]['parameters'] / 1e6:.1f} M parameters; peaks at batch {', '.join(args.batch_sizes.split(','))}\n")
    print(f"| variant | trainable M | step s (batch {rows[0]['batch']}) | peak GiB | per image GiB | fixed GiB | "
          f"largest batch in {args.gpu_gib:g} GiB, {args.image_size}² / {2 * args.image_size}² (est.) |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(row["variant"] for row in rows):
        measured = [row for row in rows if row["variant"] == name]
        fit = fits.get(name)
        numbers = (f"{fit['per_image_gib']:.2f} | {fit['fixed_gib']:.2f} | {fit['largest_batch']} / "
                   f"{fit['largest_batch_4x_tokens']}") if fit else "— | — | —"
        peaks = " / ".join(f"{row['peak_gib']:.2f}" for row in measured)
        print(f"| {name} | {measured[0]['trainable_parameters'] / 1e6:.1f} | {measured[0]['step_seconds']:.1f} | "
              f"{peaks} | {numbers} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "device": args.device, "preset": args.preset, "image_size": args.image_size,
                       "gpu_gib": args.gpu_gib, "rows": rows, "largest_batches": fits}, f, indent=1)


if __name__ == "__main__":
    main()
