"""The neck's forward and backward with its convolution weights channels-last (as the detector keeps them,
`neck_channels_last`) against channels-first (PyTorch's default layout), on the taps a DiT gives it.

    python benchmarks/neck_layout.py [--geometries small S] [--batch-size 8] [--repeats 7] [--calls 5] [--threads 1]

Geometries as in throughput.py ("small": the built-in job's detector, 64-wide taps on 16x16 tokens; "S": DiT-S/2's
width 384 on 8x8 tokens), each with the C2f neck of the "small" preset and the simple pyramid neck. The taps are
what the backbone hands the neck: token sequences viewed as `[batch, hidden, h, w]` maps, so channels-last in memory.
Both layouts compute the same pyramid (tests/test_modeling.py checks it). Times: CPU-seconds of this process per
forward and backward (`time.process_time`, robust to other jobs on a shared machine), median (min-max) over
`--repeats` rounds of `--calls` calls, the two layouts alternating in every round.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics

import torch
from throughput import CPU_GEOMETRIES, alternating_cpu_seconds, our_config, simple_neck, spread

from modeling_dit_detection import DiTForObjectDetection


def taps_like_the_backbone(config, batch: int) -> list[torch.Tensor]:
    """`[batch, hidden, h, w]` views of `[batch, h * w, hidden]` token tensors, as `DiTBackbone` returns them."""
    backbone = config.backbone_config
    height, width = (size // backbone.backbone_stride for size in backbone.image_size)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, height * width, backbone.hidden_size, generator=generator)
            .transpose(1, 2).reshape(batch, backbone.hidden_size, height, width)
            for _ in backbone.out_indices]


def neck_step(neck: torch.nn.Module, taps: list[torch.Tensor]) -> None:
    """One forward and backward (the gradient flows to the weights and the taps)."""
    inputs = [tap.detach().requires_grad_() for tap in taps]
    sum(level.pow(2).mean() for level in neck(inputs)).backward()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", choices=CPU_GEOMETRIES, default=CPU_GEOMETRIES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}; batch {args.batch_size}; CPU-ms per neck "
          f"forward+backward, median (min-max) of {args.repeats} rounds x {args.calls} calls\n")
    print("| geometry | neck | channels-last weights (ours) | channels-first weights | x channels-last |\n"
          "|---|---|---|---|---|")
    results = {}
    for geometry in args.geometries:
        config = our_config(geometry)
        for neck_name, neck_config in (("c2f", config), ("simple", simple_neck(config))):
            torch.manual_seed(0)
            channels_last = DiTForObjectDetection(neck_config).model.neck.train()
            channels_first = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
            taps = taps_like_the_backbone(neck_config, args.batch_size)
            layouts = {"channels-last": channels_last, "channels-first": channels_first}
            calls = {layout: functools.partial(neck_step, neck, taps) for layout, neck in layouts.items()}
            times = alternating_cpu_seconds(calls, args.repeats, args.calls, warmup_calls=2)
            last, first = (statistics.median(times[layout]) for layout in layouts)
            cells = [spread(v, 1e3) for v in times.values()]
            print(f"| {geometry} | {neck_name} | {cells[0]} | {cells[1]} | {first / last:.2f} |")
            results[f"{geometry} {neck_name}"] = times
    return results


if __name__ == "__main__":
    main()
