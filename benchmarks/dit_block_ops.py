"""The DiT block's two CPU-kernel choices against torch's plain ops, in the whole detector: the tanh-GELU as
x sigmoid(2u) (`gelu_tanh`, float32 inference on a CPU) and the adaLN modulation as the LayerNorm's affine transform
(`modulated_layer_norm`), against `F.gelu(approximate="tanh")` and a parameter-free LayerNorm followed by
`x * (1 + scale) + shift`, the form of DiT's `models.py`.

    python benchmarks/dit_block_ops.py [--geometries small S] [--batch-size 8] [--repeats 7] [--calls 3] [--threads 1]

Geometries and models as in throughput.py (random weights, the "small" preset's C2f neck and decoder). Per geometry:
the op alone on the block's tensor (`[batch * tokens, 4 * hidden]` for the GELU, `[batch, tokens, hidden]` for the
norm), then the detector's inference at `--batch-size` and its training step (forward with the loss, backward, fused
AdamW), once with the block's ops and once with torch's plain ones patched in. Times: CPU-seconds of this process per
call (`time.process_time`, robust to other jobs on a shared machine), median (min-max) over `--repeats` rounds of
`--calls` calls, the two variants alternating in every round. Both compute the same function
(tests/test_backbone.py checks them against each other).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

import torch
import torch.nn.functional as F
from throughput import (CPU_GEOMETRIES, alternating_cpu_seconds, infer, make_batch, make_optimizer, our_config, ours,
                        spread, train_step)

from modeling_dit_detection import modeling_dit_backbone


def torch_gelu_tanh(hidden_states: torch.Tensor) -> torch.Tensor:
    return F.gelu(hidden_states, approximate="tanh")


def torch_modulated_layer_norm(hidden_states, shift, scale, eps):
    return F.layer_norm(hidden_states, hidden_states.shape[-1:], eps=eps) * (1 + scale) + shift


@contextlib.contextmanager
def torch_ops(enabled: bool):
    """Within: the backbone's blocks run torch's plain ops (when `enabled`)."""
    saved = modeling_dit_backbone.gelu_tanh, modeling_dit_backbone.modulated_layer_norm
    if enabled:
        modeling_dit_backbone.gelu_tanh = torch_gelu_tanh
        modeling_dit_backbone.modulated_layer_norm = torch_modulated_layer_norm
    try:
        yield
    finally:
        modeling_dit_backbone.gelu_tanh, modeling_dit_backbone.modulated_layer_norm = saved


def geometry_calls(geometry: str, batch: int) -> dict[str, dict]:
    """`{measurement: {"block ops": fn, "torch ops": fn}}` for one geometry."""
    config = our_config(geometry)
    backbone = config.backbone_config
    height, width = (size // backbone.backbone_stride for size in backbone.image_size)
    tokens = batch * height * width
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(tokens, int(backbone.hidden_size * backbone.mlp_ratio), generator=generator)
    hidden = torch.randn(batch, tokens // batch, backbone.hidden_size, generator=generator)
    shift, scale = torch.randn(2, 1, 1, backbone.hidden_size, generator=generator)
    eps = backbone.attention_norm_eps

    torch.manual_seed(0)
    model = ours(config, train_backbone=True)
    optimizer = make_optimizer(model)
    pixels, labels = make_batch(geometry, batch, torch.device("cpu"))

    def variants(fn):
        def with_ops(plain):
            def call():
                with torch_ops(plain):
                    return fn()
            return call
        return {"block ops": with_ops(False), "torch ops": with_ops(True)}

    def gelu():
        with torch.no_grad():
            return modeling_dit_backbone.gelu_tanh(activations)

    def norm():
        with torch.no_grad():
            return modeling_dit_backbone.modulated_layer_norm(hidden, shift, scale, eps)

    return {
        "GELU alone": variants(gelu),
        "modulated norm alone": variants(norm),
        f"detector inference b{batch}": variants(lambda: infer(model, pixels)),
        f"detector train step b{batch}": variants(lambda: train_step(model, optimizer, pixels, labels)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", choices=CPU_GEOMETRIES, default=CPU_GEOMETRIES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}; CPU-ms per call, median (min-max) of "
          f"{args.repeats} rounds x {args.calls} calls, the variants alternating\n")
    print("| geometry | measurement | block ops (ours) | torch's plain ops | x block ops |\n|---|---|---|---|---|")
    results = {}
    for geometry in args.geometries:
        for measurement, calls in geometry_calls(geometry, args.batch_size).items():
            times = alternating_cpu_seconds(calls, args.repeats, args.calls)
            ours_ms, plain_ms = (statistics.median(times[variant]) for variant in calls)
            cells = [spread(times[variant], 1e3, 2 if ours_ms < 1e-2 else 1) for variant in calls]
            print(f"| {geometry} | {measurement} | {cells[0]} | {cells[1]} | {plain_ms / ours_ms:.2f} |")
            results[f"{geometry} {measurement}"] = times
    return results


if __name__ == "__main__":
    main()
