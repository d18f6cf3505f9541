"""Share of a training step spent in the Hungarian matcher, for the built-in job's model ("small" preset).

    python benchmarks/matcher_share.py [--batch-size 16] [--steps 6]

One process, CPU or the first GPU; the matcher's calls (cost matrices + scipy assignments) are timed inside full
training steps (forward with the loss, backward, AdamW step) after two warm-up steps. On a GPU each call is timed
from a synchronisation, so the forward still queued before it is not counted as the matcher's.
"""

import argparse
import time

import torch

from modeling_dit_detection import DiTDetectionConfig, DiTForObjectDetection
from modeling_dit_detection.loss_dit_detection import HungarianMatcher


def random_labels(batch: int, num_labels: int, generator: torch.Generator) -> list[dict]:
    """0 to 4 boxes per image, inside the image, random classes (the built-in data's object counts)."""
    labels = []
    for i in range(batch):
        count = i % 5
        size = 0.1 + 0.3 * torch.rand(count, 2, generator=generator)
        center = size / 2 + (1 - size) * torch.rand(count, 2, generator=generator)
        labels.append({"class_labels": torch.randint(0, num_labels, (count,), generator=generator),
                       "boxes": torch.cat([center, size], dim=1)})
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = DiTDetectionConfig.from_preset("small", id2label={i: str(i) for i in range(5)})
    model = DiTForObjectDetection(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)  # the Trainer's adamw_torch_fused
    pixels = torch.rand(args.batch_size, 3, *config.image_size, device=device) * 2 - 1
    labels = [{k: v.to(device) for k, v in t.items()}
              for t in random_labels(args.batch_size, 5, torch.Generator().manual_seed(0))]

    spent = {"seconds": 0.0, "calls": 0}
    matcher_call = HungarianMatcher.__call__

    def timed(self, *call_args, **call_kwargs):
        # On a GPU the matcher's copy to the CPU waits for the queued forward: wait first, so only the matcher counts.
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = matcher_call(self, *call_args, **call_kwargs)
        spent["seconds"] += time.perf_counter() - start
        spent["calls"] += 1
        return result

    HungarianMatcher.__call__ = timed

    def step():
        model(pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step()
    spent.update(seconds=0.0, calls=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"device {device}, batch {args.batch_size}: step {total / args.steps * 1000:.0f} ms, matcher "
          f"{spent['seconds'] / args.steps * 1000:.1f} ms per step ({spent['seconds'] / total:.1%} of the step), "
          f"{spent['calls'] // args.steps} matcher calls per step")


if __name__ == "__main__":
    main()
