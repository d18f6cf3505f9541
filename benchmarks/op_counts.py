"""Operator counts per step of our detector and the peers of `throughput.py`: what a launch-bound GPU step pays for.

    python benchmarks/op_counts.py [--geometries small S] [--json out.json]

On a GPU the models of the throughput table are bound by launching kernels one at a time from Python, not by
arithmetic (README "Performance"), so a step's time follows its operator count. This counts the aten operators a step
dispatches (a `TorchDispatchMode`, below autograd, so the backward's operators count too), split into those that
compute (each a kernel launch on a GPU) and views (`view`, `t`, `select`, ...: metadata only, no kernel). Training:
one forward with the loss on random boxes and its backward at batch 8 (no optimizer step: AdamW's foreach kernels
are the same few per parameter group for every model); inference: one eval forward at batch 8. Counts are exact and
independent of the machine and its load; CPU only, in seconds.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented hook for every dispatched operator
from throughput import CPU_GEOMETRIES, GEOMETRIES, TRAIN_BATCH, make_batch, row_specs


# Operators that return an alias without saying so in their schema: metadata only, like the views.
NO_KERNEL = (torch.ops.aten.detach, torch.ops.aten._unsafe_view, torch.ops.aten.alias)


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched inside it, by name, as computing or view."""

    def __init__(self):
        super().__init__()
        self.computing, self.views = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view or func.overloadpacket in NO_KERNEL else self.computing)[
            str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, geometry: str) -> dict:
    pixels, labels = make_batch(geometry, TRAIN_BATCH, torch.device("cpu"))
    model.train()
    with OpCounter() as train:
        model(pixel_values=pixels, labels=labels).loss.backward()
    model.eval()
    with torch.no_grad(), OpCounter() as infer:
        model(pixel_values=pixels)
    return {"train_computing": sum(train.computing.values()), "train_views": sum(train.views.values()),
            "infer_computing": sum(infer.computing.values()), "infer_views": sum(infer.views.values()),
            "train_top": train.computing.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=CPU_GEOMETRIES)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results, reference = [], {}
    print("| model | train: computing ops (x ours) | train: views | inference b8: computing ops (x ours) | "
          "inference: views |\n|---|---|---|---|---|")
    for spec in row_specs(args.geometries):
        torch.manual_seed(0)
        result = {"name": spec.name, "geometry": spec.geometry, **count(spec.build(), spec.geometry)}
        ours = reference.setdefault(spec.geometry, result)
        results.append(result)
        print(f"| {spec.name} | {result['train_computing']} ({result['train_computing'] / ours['train_computing']:.2f})"
              f" | {result['train_views']} | {result['infer_computing']} "
              f"({result['infer_computing'] / ours['infer_computing']:.2f}) | {result['infer_views']} |", flush=True)
    print()
    for result in results:
        print(f"- {result['name']}, most frequent in training: "
              + ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in result["train_top"]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
