"""Training and inference speed of our detector against transformers' LW-DETR and DETR at matched size, random weights.

    python benchmarks/throughput.py [--device cpu|cuda] [--repeats 5] [--warmup 2] [--steps 3] [--json out.json]
                                    [--bf16] [--compile] [--geometries small S S-256 XL-256] [--no-memory]

Rows per geometry: ours training everything ("full") and with the backbone frozen (`set_trainable`, stage one of
run_detection.py), with the simple pyramid neck, and with the conditioning folded (`fold_conditioning()`, what a
trained detector can be saved as for inference); `LwDetrForObjectDetection` with our backbone's width, depth, heads,
patch and taps and our decoder's sizes; `DetrForObjectDetection` on our `DiTBackbone` (AutoBackbone). "small" is the
README's scratch detector (`from_preset("small")`, 64x64 pixels, ~770 k parameters). "S" is DiT-S/2's width 384 and 6
heads, depth 12 with the default taps (6, 8, 9), of which the 9 blocks up to the deepest tap are built (as the
converter does), on the same 64x64 pixels with pixel-space patches of 8: DiT-S/2's 32x32 latent grid is too slow on
CPU, this grid of 8x8 tokens trains a batch of 8 in under 1 s on 2 cores (0.4 to 1 s on a shared machine). For a GPU:
"S-256" is the same model and "XL-256" DiT-XL/2's width 1152 and 16 heads, depth 28 with taps (14, 18, 21) (21 blocks
built), both on 256x256 pixels with patches of 16, i.e. DiT's real 16x16 token grid at 256x256 (without the VAE);
every geometry keeps the "small" preset's decoder (d_model 64, 20 queries, 4 groups), so the rows compare backbones
and necks. `--compile` adds a row per geometry: ours (full) through `torch.compile` (default mode), timed after the
warm-up steps that compile it (their seconds are printed).

Forward GFLOPs per image are counted with `FlopCounterMode` (matmuls, convolutions, attention, with the attention
formulas also applied to the CPU kernel, which the counter leaves out; not grid_sample or elementwise ops) and
printed next to ours, so the match is visible. Training: forward with the loss on random boxes (0 to 4 per image),
backward, AdamW step (fused, the Trainer's default `adamw_torch_fused`), batch 8. Inference: eval mode, no_grad,
batch 1 and 8. Memory: each row alone in a child process, the training peak above what a first step leaves
(activations and gradients). MFU: counted FLOPs of a training step (forward + backward) or of a forward per second,
over the matmul peak measured in the run. Times: median (min-max) over `--repeats` rounds of `--steps` steps, each
round running every row in turn (A B C A B C ...), after `--warmup` steps; "x ours" ratios pair the rounds (a row's
time over ours' in the same round, median and min-max over the rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import DetrConfig, DetrForObjectDetection, LwDetrConfig, LwDetrForObjectDetection, LwDetrViTConfig

from matcher_share import random_labels
from modeling_dit_detection import DiTBackboneConfig, DiTDetectionConfig, DiTForObjectDetection, default_out_indices
from modeling_dit_detection.configuration_dit_detection import BACKBONE_ARGUMENTS
from modeling_dit_detection.training.stages import set_trainable

NUM_LABELS = 5
TRAIN_BATCH = 8
S_TAPS = default_out_indices(12)  # (6, 8, 9): DiT-S/2's depth, default taps
XL_TAPS = default_out_indices(28)  # (14, 18, 21): DiT-XL/2's
# Backbone overrides of the "small" preset per geometry. The 256x256 ones (for a GPU) have DiT's real token grid at
# 256x256, 16x16 tokens (pixel patches of 16 where DiT has the VAE's 8x latent and patches of 2).
GEOMETRIES = {
    "small": {},
    "S": {"hidden_size": 384, "num_hidden_layers": S_TAPS[-1], "num_attention_heads": 6, "patch_size": 8,
          "out_indices": S_TAPS},
    "S-256": {"hidden_size": 384, "num_hidden_layers": S_TAPS[-1], "num_attention_heads": 6, "patch_size": 16,
              "out_indices": S_TAPS, "image_size": [256, 256]},
    "XL-256": {"hidden_size": 1152, "num_hidden_layers": XL_TAPS[-1], "num_attention_heads": 16, "patch_size": 16,
               "out_indices": XL_TAPS, "image_size": [256, 256]},
}
CPU_GEOMETRIES = ["small", "S"]
# Peer sizes that bring their forward FLOPs to within ~11 % of ours in every geometry (the table prints the ratio):
# LW-DETR's projector runs a C2f block of this many 3x3-conv pairs per pyramid level (LW-DETR: 3), and DETR this many
# encoder layers over its one map (DETR: 6), where ours builds a three-level pyramid. The small geometry's map has
# 16x16 tokens, whose attention makes DETR's encoder layers dearer there than over the 8x8 of "S": there 6 layers give
# 0.995x ours' FLOPs with the C2f neck (5 gave 0.91x); at "S" the rest of the gap is the neck's 384-channel
# convolutions, which encoder layers of DETR's width (about 0.005 GFLOP each over 8x8 tokens) cannot match.
LWDETR_C2F_BLOCKS = 2
DETR_ENCODER_LAYERS = {"small": 6, "S": 10, "S-256": 10, "XL-256": 10}


@dataclass
class RowSpec:
    name: str
    geometry: str
    build: Callable[[], torch.nn.Module]
    note: str = ""
    reference: bool = False  # the row the others of its geometry are compared with
    compiled: bool = False  # timed through torch.compile (default mode); FLOPs are counted on the eager model


@dataclass
class Row:
    spec: RowSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    counts: dict
    times: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "infer_b1": [], "infer_b8": []})
    warmup_seconds: dict[str, float] = field(default_factory=dict)  # includes torch.compile's compilation


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------


def our_config(geometry: str) -> DiTDetectionConfig:
    return DiTDetectionConfig.from_preset("small", id2label={i: str(i) for i in range(NUM_LABELS)},
                                          **GEOMETRIES[geometry])


def lwdetr_config(config: DiTDetectionConfig) -> LwDetrConfig:
    """LW-DETR with our backbone's geometry and taps (global attention everywhere, as ours) and our decoder."""
    backbone = config.backbone_config
    height, width = backbone.image_size
    if height != width:
        raise ValueError(f"LwDetrViTConfig takes square images only, ours is {height}x{width}")
    vit = LwDetrViTConfig(hidden_size=backbone.hidden_size, num_hidden_layers=backbone.num_hidden_layers,
                          num_attention_heads=backbone.num_attention_heads, mlp_ratio=int(backbone.mlp_ratio),
                          patch_size=backbone.patch_size, image_size=height, pretrain_image_size=height,
                          num_windows=1, window_block_indices=[], out_indices=list(backbone.out_indices))
    return LwDetrConfig(backbone_config=vit, projector_scale_factors=list(config.pyramid_scales),
                        c2f_num_blocks=LWDETR_C2F_BLOCKS, d_model=config.d_model,
                        decoder_layers=config.decoder_layers, decoder_ffn_dim=config.decoder_ffn_dim,
                        decoder_n_points=config.decoder_n_points,
                        decoder_self_attention_heads=config.decoder_attention_heads,
                        decoder_cross_attention_heads=config.decoder_attention_heads,
                        num_queries=config.num_queries, group_detr=config.num_query_groups, id2label=config.id2label)


def detr_config(config: DiTDetectionConfig, encoder_layers: int) -> DetrConfig:
    """DETR on our DiT backbone (AutoBackbone), tapped at our deepest stage, with our decoder's sizes,
    `encoder_layers` encoder layers of our decoder's width over that map, a loss on every decoder layer and no
    dropout, as ours."""
    fields = {name: getattr(config.backbone_config, name) for name in BACKBONE_ARGUMENTS - {"out_features"}}
    backbone = DiTBackboneConfig(**{**fields, "out_indices": [max(config.backbone_config.out_indices)]})
    return DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                      d_model=config.d_model, encoder_layers=encoder_layers,
                      encoder_ffn_dim=config.decoder_ffn_dim, encoder_attention_heads=config.decoder_attention_heads,
                      decoder_layers=config.decoder_layers,
                      decoder_ffn_dim=config.decoder_ffn_dim, decoder_attention_heads=config.decoder_attention_heads,
                      num_queries=config.num_queries, auxiliary_loss=True, dropout=0.0, id2label=config.id2label)


def simple_neck(config: DiTDetectionConfig) -> DiTDetectionConfig:
    simple = copy.deepcopy(config)
    simple.neck, simple.neck_blocks = "simple", 0
    return simple


def ours(config: DiTDetectionConfig, train_backbone: bool, fold: bool = False) -> DiTForObjectDetection:
    if fold:  # folding marks the model's config folded: a copy, so rows built from the same config stay as they are
        config = copy.deepcopy(config)
    model = DiTForObjectDetection(config)
    if fold:  # the fixed conditioning's modulation as constants: identical outputs, no adaLN MLPs to run
        model.fold_conditioning()
    set_trainable(model, train_backbone=train_backbone)
    return model


def row_specs(geometries: list[str], compile_ours: bool = False) -> list[RowSpec]:
    specs = []
    for geometry in geometries:
        config = our_config(geometry)
        specs += [
            RowSpec(f"ours {geometry}, full", geometry, lambda c=config: ours(c, True), reference=True),
            *([RowSpec(f"ours {geometry}, full, torch.compile", geometry, lambda c=config: ours(c, True),
                       "torch.compile(model), default mode; the loss's matcher (scipy) and box losses break the graph",
                       compiled=True)] if compile_ours else []),
            RowSpec(f"ours {geometry}, frozen backbone", geometry, lambda c=config: ours(c, False)),
            RowSpec(f"ours {geometry}, simple neck", geometry, lambda c=config: ours(simple_neck(c), True),
                    "the preset before the C2f neck: ViTDet's simple pyramid"),
            RowSpec(f"ours {geometry}, conditioning folded", geometry,
                    lambda c=config: ours(c, True, fold=True),
                    "`model.fold_conditioning()`: each block's adaLN MLP replaced by the modulation it gives for the "
                    "fixed timestep and null class (same outputs; trains the modulation as free parameters)"),
            RowSpec(f"LW-DETR {geometry}", geometry, lambda c=config: LwDetrForObjectDetection(lwdetr_config(c)),
                    f"C2f blocks {LWDETR_C2F_BLOCKS}, no windowed attention"),
            RowSpec(f"DETR + DiT {geometry}", geometry,
                    lambda c=config, n=DETR_ENCODER_LAYERS[geometry]: DetrForObjectDetection(detr_config(c, n)),
                    f"one tap (the deepest), {DETR_ENCODER_LAYERS[geometry]} encoder layers, no query groups"),
        ]
    return specs


def image_size(geometry: str) -> list[int]:
    return our_config(geometry).image_size


def make_batch(geometry: str, batch: int, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, *image_size(geometry), generator=generator) * 2 - 1).to(device)
    labels = [{k: v.to(device) for k, v in t.items()} for t in random_labels(batch, NUM_LABELS, generator)]
    return pixels, labels


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable)."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def build_on(spec: RowSpec, device: torch.device) -> torch.nn.Module:
    """The row's (eager) model, initialised where it runs: a 500 M-parameter model inits in seconds on a GPU."""
    torch.manual_seed(0)
    with device:
        return spec.build().to(device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer run_detection.py trains with: the Trainer's default, `adamw_torch_fused` (one kernel per
    parameter; torch's plain AdamW loops over the parameters with several elementwise ops each on a CPU)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


# ------------------------------------------------------------------------------------------------------------------
# Steps and counts
# ------------------------------------------------------------------------------------------------------------------


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model, optimizer, pixels, labels, bf16: bool = False) -> torch.Tensor:
    model.train()
    with autocast(pixels.device, bf16):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def infer(model, pixels, bf16: bool = False):
    model.eval()
    with torch.no_grad(), autocast(pixels.device, bf16):
        return model(pixel_values=pixels)


# FlopCounterMode has formulas for the GPU attention kernels (flash, memory-efficient, cuDNN) but not for the CPU one
# that `scaled_dot_product_attention` dispatches to, which it would count as 0: the same formulas, for it.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad_out, query, key, value),
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def forward_flops(model, pixels) -> float:
    """FLOPs of one eval-mode forward per image. Counted with gradients enabled: FlopCounterMode's module tracker
    fails under no_grad."""
    model.eval()
    with flop_counter() as counter:
        model(pixel_values=pixels)
    return counter.get_total_flops() / pixels.shape[0]


def train_flops(model, pixels, labels) -> float:
    """FLOPs of one training forward with the loss and its backward per image (no optimizer step, gradients
    dropped)."""
    model.train()
    with flop_counter() as counter:
        model(pixel_values=pixels, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / pixels.shape[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_clock(device: torch.device) -> Callable[[], float]:
    """CPU-seconds of this process (all its threads) on a CPU, which other jobs on a shared machine distort less
    than wall time; wall seconds on a GPU."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device,
                     clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of `fn` by `clock` (default: wall), the device synchronised around the calls."""
    synchronize(device)
    start = clock()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (clock() - start) / calls


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, calls: int = 5) -> float:
    """FLOP/s of a `size` x `size` matmul, the best of `calls` after one warm-up."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    best = min(seconds_per_call(lambda: a @ b, 1, device) for _ in range(calls))
    return 2 * size**3 / best


# ------------------------------------------------------------------------------------------------------------------
# Memory (one row alone, in a child process)
# ------------------------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def training_memory(spec: RowSpec, device: torch.device, bf16: bool, steps: int = 2) -> dict:
    """Peak memory of `steps` training steps at batch 8 above what a first step at batch 1 leaves behind (the
    weights, AdamW's states, lazily loaded libraries and kernels): activations, gradients and their workspace."""
    eager = build_on(spec, device)
    optimizer = make_optimizer(eager)
    model = torch.compile(eager) if spec.compiled else eager
    pixels, labels = make_batch(spec.geometry, TRAIN_BATCH, device)
    train_step(model, optimizer, pixels[:1], labels[:1], bf16)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            train_step(model, optimizer, pixels, labels, bf16)
        synchronize(device)
        return {"bytes": torch.cuda.max_memory_allocated(device) - base, "method": "CUDA max_memory_allocated"}
    # Not ru_maxrss: a child started by fork + exec inherits its parent's peak there.
    if _reset_peak_rss() and _status_bytes("VmRSS") is not None:
        base = _status_bytes("VmRSS")
        for _ in range(steps):
            train_step(model, optimizer, pixels, labels, bf16)
        return {"bytes": _status_bytes("VmHWM") - base,
                "method": "CPU peak RSS (VmHWM, reset before the steps) minus RSS before (VmRSS), /proc/self/status"}
    return {"bytes": None, "method": "CPU peak RSS needs Linux's /proc/self/clear_refs"}


def child_memory(index: int, args) -> dict:
    command = ([sys.executable, __file__, "--child-memory", str(index), "--device", args.device,
                "--geometries", *args.geometries] + (["--bf16"] if args.bf16 else [])
               + (["--compile"] if args.compile else []))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        return {"bytes": None, "method": "failed: " + (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------


def counts(model: torch.nn.Module, geometry: str, device: torch.device) -> dict:
    pixels, labels = make_batch(geometry, TRAIN_BATCH, device)
    parameters, trainable = count_parameters(model)
    return {"parameters": parameters, "trainable_parameters": trainable,
            "forward_flops_per_image": forward_flops(model, pixels[:1]),
            "train_flops_per_image": train_flops(model, pixels, labels)}


def build_rows(specs: list[RowSpec], device: torch.device) -> tuple[list[Row], list[tuple[str, str]]]:
    """Every model built, its parameters and FLOPs counted; one that fails is left out with the reason."""
    rows, skipped = [], []
    for spec in specs:
        try:
            model = build_on(spec, device)
            row_counts = counts(model, spec.geometry, device)
            optimizer = make_optimizer(model)
            rows.append(Row(spec, torch.compile(model) if spec.compiled else model, optimizer, row_counts))
            print(f"built {spec.name}: {row_counts['parameters'] / 1e6:.1f} M parameters, "
                  f"{row_counts['forward_flops_per_image'] / 1e9:.2f} forward GFLOP per image", flush=True)
        except Exception as error:  # a peer that transformers cannot configure is reported, not faked
            skipped.append((spec.name, f"{type(error).__name__}: {error}"))
    return rows, skipped


def measure(rows: list[Row], device: torch.device, args) -> list[tuple[str, str]]:
    """Warm up every row, then `args.repeats` rounds, each timing every row in turn. Rows that fail are dropped and
    returned with the reason."""
    batches = {row.spec.geometry: make_batch(row.spec.geometry, TRAIN_BATCH, device) for row in rows}
    kinds = {
        "train": lambda row, pixels, labels: train_step(row.model, row.optimizer, pixels, labels, args.bf16),
        "infer_b1": lambda row, pixels, labels: infer(row.model, pixels[:1], args.bf16),
        "infer_b8": lambda row, pixels, labels: infer(row.model, pixels, args.bf16),
    }
    failed = []
    for repeat in range(-1 if args.warmup else 0, args.repeats):  # round -1: warm-up, not recorded
        for kind, step in kinds.items():
            for row in list(rows):
                pixels, labels = batches[row.spec.geometry]
                call = functools.partial(step, row, pixels, labels)
                calls = args.warmup if repeat < 0 else args.steps
                try:
                    seconds = seconds_per_call(call, calls, device)
                except Exception as error:
                    rows.remove(row)
                    failed.append((row.spec.name, f"{kind} failed: {type(error).__name__}: {error}"))
                    continue
                if repeat >= 0:
                    row.times[kind].append(seconds)
                else:
                    row.warmup_seconds[kind] = seconds * calls
        print(f"round {repeat + 1} of {args.repeats} done" if repeat >= 0 else "warm-up done", flush=True)
    return failed


def alternating_cpu_seconds(calls: dict[str, Callable[[], object]], repeats: int, calls_per_round: int,
                            warmup_calls: int = 1) -> dict[str, list[float]]:
    """`{variant: [CPU-seconds per call of this process, one per round]}` for CPU variants timed against each other:
    every round times each variant `calls_per_round` times, in order on even rounds and in reverse on odd ones, so
    that the load of other jobs falls on all of them alike."""
    cpu = torch.device("cpu")
    for fn in calls.values():
        seconds_per_call(fn, warmup_calls, cpu, time.process_time)
    times = {variant: [] for variant in calls}
    for repeat in range(repeats):
        for variant in (list(calls) if repeat % 2 == 0 else list(calls)[::-1]):
            times[variant].append(seconds_per_call(calls[variant], calls_per_round, cpu, time.process_time))
    return times


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """median (min-max) of values x scale."""
    scaled = sorted(v * scale for v in values)
    return f"{statistics.median(scaled):.{digits}f} ({scaled[0]:.{digits}f}-{scaled[-1]:.{digits}f})"


def summarize(row: Row, peak: float) -> dict:
    """The row's counts and times; MFU from the median times against `peak` FLOP/s."""
    images_per_second = TRAIN_BATCH / statistics.median(row.times["train"])
    return {
        "name": row.spec.name, "geometry": row.spec.geometry, "note": row.spec.note, "reference": row.spec.reference,
        "compiled": row.spec.compiled,
        **row.counts, "train_step_seconds": row.times["train"], "infer_b1_seconds": row.times["infer_b1"],
        "infer_b8_seconds": row.times["infer_b8"], "warmup_seconds": row.warmup_seconds,
        "train_images_per_second": images_per_second,
        "mfu_train": row.counts["train_flops_per_image"] * images_per_second / peak,
        "mfu_infer_b8": row.counts["forward_flops_per_image"] * TRAIN_BATCH / statistics.median(row.times["infer_b8"])
        / peak,
    }


def _ratio(result: dict, reference: dict | None, key: str) -> str:
    """The row's time over the reference row's in the same round, median (min-max) over the rounds: pairing by round
    cancels the load that drifts between rounds on a shared machine."""
    if reference is None:
        return "-"
    if result is reference:
        return "1.00"
    ratios = [value / reference_value for value, reference_value in zip(result[key], reference[key], strict=True)]
    return spread(ratios, digits=2)


COLUMNS = ["model", "params (trainable)", "fwd GFLOPs/img (x ours)", "train GFLOPs/img", "train img/s (b8)",
           "train time x ours", "infer ms b1", "infer ms b8", "infer b8 x ours", "train mem MiB", "MFU train",
           "MFU infer b8"]


def table(results: list[dict]) -> str:
    """A markdown table; ratios are to the reference row ("ours ..., full") of the same geometry."""
    reference = {r["geometry"]: r for r in results if r["reference"]}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        ours_row = reference.get(r["geometry"])
        flops = r["forward_flops_per_image"]
        flops_ratio = f"{flops / ours_row['forward_flops_per_image']:.2f}" if ours_row else "-"
        memory = "-" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        cells = [r["name"], f"{r['parameters'] / 1e6:.3f} M ({r['trainable_parameters'] / 1e6:.3f} M)",
                 f"{flops / 1e9:.3f} ({flops_ratio})", f"{r['train_flops_per_image'] / 1e9:.3f}",
                 spread([TRAIN_BATCH / s for s in r["train_step_seconds"]]), _ratio(r, ours_row, "train_step_seconds"),
                 spread(r["infer_b1_seconds"], 1e3), spread(r["infer_b8_seconds"], 1e3),
                 _ratio(r, ours_row, "infer_b8_seconds"), memory, f"{r['mfu_train']:.1%}", f"{r['mfu_infer_b8']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return (f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, float32 matmul precision {torch.get_float32_matmul_precision()}")


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each kind per row before the first round")
    parser.add_argument("--steps", type=int, default=3, help="steps per row and round")
    parser.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=CPU_GEOMETRIES,
                        help="the 256x256 ones are sized for a GPU")
    parser.add_argument("--bf16", action="store_true", help="forward under torch.autocast(bfloat16)")
    parser.add_argument("--compile", action="store_true",
                        help="add a row per geometry: ours (full) through torch.compile, timed after its compilation")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure training peak memory, each row in a child process")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    specs = row_specs(args.geometries, args.compile)
    if args.child_memory is not None:
        print(json.dumps(training_memory(specs[args.child_memory], device, args.bf16)))
        return

    print(machine(device), "|", load(), "at start", flush=True)
    matmul_dtype = torch.bfloat16 if args.bf16 else torch.float32
    size = 8192 if device.type == "cuda" else 2048
    peaks = [matmul_peak(device, matmul_dtype, size)]
    rows, skipped = build_rows(specs, device)
    skipped += measure(rows, device, args)
    peaks.append(matmul_peak(device, matmul_dtype, size))
    results = [summarize(row, max(peaks)) for row in rows]
    if args.memory:
        for row, result in zip(rows, results):
            memory = child_memory(specs.index(row.spec), args)
            result.update(peak_memory_bytes=memory["bytes"], peak_memory_method=memory["method"])

    print(f"matmul peak ({matmul_dtype}, {size}x{size}): "
          + ", ".join(f"{p / 1e9:.0f}" for p in peaks) + " GFLOP/s (start, end); MFU uses the larger")
    print(f"{args.repeats} rounds x {args.steps} steps after {args.warmup} warm-up steps; "
          f"{'bfloat16 autocast' if args.bf16 else 'float32'}; train batch {TRAIN_BATCH}\n")
    print(table(results))
    print()
    for result in results:
        if result["note"]:
            print(f"- {result['name']}: {result['note']}")
    for result in results:
        if result["compiled"]:
            warmup = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in result["warmup_seconds"].items())
            print(f"- {result['name']}: warm-up ({args.warmup} steps of each kind, compilation included): {warmup}")
    if results and args.memory:
        methods = "; ".join(sorted({r["peak_memory_method"] for r in results}))
        print(f"- train mem: each row alone in a child process, peak of 2 training steps at batch {TRAIN_BATCH} above "
              f"the memory after a first step at batch 1 (weights, AdamW states, libraries), i.e. activations and "
              f"gradients; {methods}")
    for name, reason in skipped:
        print(f"- left out: {name}: {reason}")
    print(f"\n{load()} at end")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine(device), "matmul_peak_flops": peaks, "args": vars(args),
                       "results": results, "skipped": skipped}, file, indent=1)


if __name__ == "__main__":
    main()
