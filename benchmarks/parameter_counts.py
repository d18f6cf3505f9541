"""Parameter counts of the DiT presets: whole backbone, as loaded with the default taps, and folded.

    python benchmarks/parameter_counts.py

Models are built on the meta device: no memory, no download, seconds on a CPU.
"""

import torch

from modeling_dit_detection import DIT_PRESETS, DiTDetectionConfig, DiTDetectionModel, default_out_indices


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def main() -> None:
    print(f"{'preset':<10}{'all blocks':>14}{'taps':>14}{'blocks kept':>13}{'kept':>14}{'kept+folded':>14}"
          f"{'folding saves':>15}{'head':>12}")
    for name, geometry in DIT_PRESETS.items():
        taps = default_out_indices(geometry["num_hidden_layers"])  # stages: stage i is the output of block i
        with torch.device("meta"):
            full = DiTDetectionModel(DiTDetectionConfig.from_preset(name))
            kept = DiTDetectionModel(DiTDetectionConfig.from_preset(name, num_hidden_layers=taps[-1]))
            folded = DiTDetectionModel(DiTDetectionConfig.from_preset(name, num_hidden_layers=taps[-1],
                                                                      fold_conditioning=True))
        # The DiT alone: the VAE encoder (frozen, the same in every row) is not counted.
        all_blocks, kept_backbone, folded_backbone = (count(m.backbone) - count(m.backbone.vae)
                                                      for m in (full, kept, folded))
        head = count(kept) - count(kept.backbone)
        saved = 1 - folded_backbone / kept_backbone
        print(f"{name:<10}{all_blocks:>14,}{str(taps):>14}{taps[-1]:>13}{kept_backbone:>14,}{folded_backbone:>14,}"
              f"{saved:>14.1%}{head:>12,}")


if __name__ == "__main__":
    main()
