"""Our detector in float32 against bfloat16 autocast (the matcher and the loss stay float32 inside), same weights.

    python benchmarks/mixed_precision.py [--geometries small S] [--repeats 5] [--steps 3] [--device cpu|cuda]
                                         [--json out.json]

Per geometry of benchmarks/throughput.py ("small": the built-in job's detector, 64x64; "S": DiT-S/2's width and
heads, 9 blocks): a training step (forward with the loss on random boxes, backward, AdamW; batch 8) and inference at
batch 8, each in float32 and under `torch.autocast(bfloat16)`, the two precisions alternating in every round (A B, B
A, ...) from the same initial weights. Times: CPU-seconds of the process on a CPU (robust to other jobs on a shared
machine; bfloat16 matmuls need AVX512-BF16 / AMX to be fast there), wall seconds on a GPU; median (min-max) over
`--repeats` rounds of `--steps` calls after a warm-up. Also: the loss of the first training step in both precisions
(it must be finite and close) and the largest difference of the inference scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from throughput import (
    GEOMETRIES,
    infer,
    make_batch,
    make_optimizer,
    our_config,
    process_clock,
    seconds_per_call,
    train_step,
)

from modeling_dit_detection import DiTForObjectDetection

PRECISIONS = ("float32", "bfloat16")


def measure(geometry: str, device: torch.device, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = DiTForObjectDetection(our_config(geometry)).to(device)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    pixels, labels = make_batch(geometry, 8, device)
    optimizer = make_optimizer(model)
    first_loss, scores = {}, {}
    for precision in PRECISIONS:
        bf16 = precision == "bfloat16"
        model.load_state_dict(initial)
        first_loss[precision] = float(train_step(model, make_optimizer(model), pixels, labels, bf16))
        model.load_state_dict(initial)
        scores[precision] = infer(model, pixels, bf16).logits.float().sigmoid()
        train_step(model, optimizer, pixels, labels, bf16)  # warm-up
    times = {f"{kind} {precision}": [] for kind in ("train", "infer_b8") for precision in PRECISIONS}
    clock = process_clock(device)
    for repeat in range(repeats):
        for precision in (PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]):
            bf16 = precision == "bfloat16"
            times[f"train {precision}"].append(seconds_per_call(
                lambda: train_step(model, optimizer, pixels, labels, bf16), steps, device, clock))
            times[f"infer_b8 {precision}"].append(seconds_per_call(
                lambda: infer(model, pixels, bf16), steps, device, clock))
    return {"geometry": geometry, "times": times, "first_loss": first_loss,
            "max_score_difference": float((scores["float32"] - scores["bfloat16"]).abs().max())}


def table(results: list[dict], unit: str) -> str:
    lines = [f"| geometry | step | float32 ({unit}) | bfloat16 ({unit}) | bfloat16 speed-up | first loss fp32 / bf16 |",
             "|---|---|---|---|---|---|"]
    for result in results:
        for kind in ("train", "infer_b8"):
            fp32, bf16 = (result["times"][f"{kind} {p}"] for p in PRECISIONS)
            loss = result["first_loss"]
            loss_text = f"{loss['float32']:.3f} / {loss['bfloat16']:.3f}" if kind == "train" else "-"
            lines.append(f"| {result['geometry']} | {kind} | {statistics.median(fp32) * 1e3:.0f} "
                         f"({min(fp32) * 1e3:.0f}-{max(fp32) * 1e3:.0f}) | {statistics.median(bf16) * 1e3:.0f} "
                         f"({min(bf16) * 1e3:.0f}-{max(bf16) * 1e3:.0f}) | "
                         f"{statistics.median(fp32) / statistics.median(bf16):.2f}x | {loss_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = [measure(geometry, device, args.repeats, args.steps) for geometry in args.geometries]
    unit = "CPU-ms" if device.type == "cpu" else "ms"
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"batch 8, median (min-max) of {args.repeats} rounds x {args.steps} calls, precisions alternating\n")
    print(table(results, unit))
    for result in results:
        print(f"{result['geometry']}: largest |score fp32 - score bf16| of the first inference "
              f"{result['max_score_difference']:.4f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, file, indent=1)
    return results


if __name__ == "__main__":
    main()
