"""The set-prediction loss with the decoder layers stacked (one matching pass, losses over a set axis) against the
same loss computed one set at a time, on the built-in job's shapes.

    python benchmarks/criterion_stacking.py [--batch-size 16] [--repeats 7] [--calls 10] [--threads 1]

Inputs: the "small" preset's loss inputs with random values: 3 decoder layers of 4 query groups x 20 queries and the
1344 proposals of a 64x64 image's three pyramid levels, 5 classes, 0 to 4 boxes per image. "per set" calls the
criterion once per set (the matcher, its CPU copy and the losses for each: what the criterion did before stacking);
"stacked" calls it once with all sets (`DiTDetectionCriterion` stacks the sets of equal shape itself). Both include
the backward pass. Times: CPU-seconds of this process per call (`time.process_time`, robust to other jobs on a shared
machine), median (min-max) over `--repeats` rounds of `--calls` calls each, the two modes alternating in every round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from matcher_share import random_labels
from throughput import seconds_per_call

from modeling_dit_detection.loss_dit_detection import DiTDetectionCriterion, HungarianMatcher, SetPredictions

LAYERS, GROUPS, QUERIES, PROPOSALS, NUM_LABELS = 3, 4, 20, 32 * 32 + 16 * 16 + 8 * 8, 5


def make_inputs(batch: int) -> tuple[list[SetPredictions], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    sets = []
    for layer in range(LAYERS):
        name = "" if layer == LAYERS - 1 else f"dec_{layer}"
        logits = torch.randn(batch, GROUPS * QUERIES, NUM_LABELS, generator=generator).requires_grad_()
        boxes = torch.rand(batch, GROUPS * QUERIES, 4, generator=generator).mul(0.5).add(0.25).requires_grad_()
        sets.append(SetPredictions(name, logits, boxes, GROUPS))
    logits = torch.randn(batch, PROPOSALS, NUM_LABELS, generator=generator).requires_grad_()
    boxes = torch.rand(batch, PROPOSALS, 4, generator=generator).mul(0.5).add(0.25).requires_grad_()
    sets.append(SetPredictions("proposals", logits, boxes, 1))
    return sets, random_labels(batch, NUM_LABELS, generator)


def loss_seconds(criterion, sets, targets, stacked: bool, calls: int) -> float:
    """CPU-seconds of one loss forward and backward, the sets stacked or one at a time."""
    def call():
        if stacked:
            total = criterion(sets, targets)[0]
        else:
            total = sum(criterion([prediction], targets)[0] for prediction in sets)
        total.backward()

    return seconds_per_call(call, calls, torch.device("cpu"), time.process_time)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    criterion = DiTDetectionCriterion(HungarianMatcher())
    sets, targets = make_inputs(args.batch_size)
    # The two modes give the same loss (tests/test_loss.py checks it to 1e-6); warm up both.
    for stacked in (False, True):
        loss_seconds(criterion, sets, targets, stacked, 2)
    times = {"per set": [], "stacked": []}
    for repeat in range(args.repeats):
        for mode in (("per set", "stacked") if repeat % 2 == 0 else ("stacked", "per set")):
            times[mode].append(loss_seconds(criterion, sets, targets, mode == "stacked", args.calls))
    per_set, stacked = (statistics.median(times[mode]) for mode in ("per set", "stacked"))
    print(f"CPU, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}; batch {args.batch_size}, {LAYERS} decoder "
          f"layers x {GROUPS} groups x {QUERIES} queries + {PROPOSALS} proposals; CPU-ms per loss forward+backward, "
          f"median (min-max) of {args.repeats} rounds x {args.calls} calls\n")
    print("| criterion | CPU-ms per call | x stacked |\n|---|---|---|")
    for mode, median in (("per set", per_set), ("stacked", stacked)):
        values = times[mode]
        print(f"| {mode} | {median * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}) | "
              f"{median / stacked:.2f} |")
    return {mode: values for mode, values in times.items()}


if __name__ == "__main__":
    main()
