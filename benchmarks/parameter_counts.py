"""Parameter counts of the DiT presets: whole backbone, as loaded with the default taps, and folded.

    python benchmarks/parameter_counts.py

Models are built on the meta device: no memory, no download, seconds on a CPU.
"""

import torch

from modeling_dit_detection import DIT_BACKBONE_PRESETS, DiTDetectionConfig, DiTDetectionModel
from modeling_dit_detection.convert_diffusers_dit import default_out_indices


def count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def main() -> None:
    print(f"{'preset':<10}{'all blocks':>14}{'taps':>14}{'blocks kept':>13}{'kept':>14}{'kept+folded':>14}"
          f"{'folding saves':>15}{'head':>12}")
    for name, geometry in DIT_BACKBONE_PRESETS.items():
        depth = geometry["num_hidden_layers"]
        taps = default_out_indices(depth)
        with torch.device("meta"):
            full = DiTDetectionModel(DiTDetectionConfig.from_preset(name, out_indices=taps))
            kept = DiTDetectionModel(DiTDetectionConfig.from_preset(name, out_indices=taps, num_hidden_layers=taps[-1] + 1))
            folded = DiTDetectionModel(DiTDetectionConfig.from_preset(
                name, out_indices=taps, num_hidden_layers=taps[-1] + 1, fold_conditioning=True))
        all_blocks, kept_backbone, folded_backbone = count(full.backbone), count(kept.backbone), count(folded.backbone)
        head = count(kept) - kept_backbone - (count(kept.vae) if kept.vae is not None else 0)
        saved = 1 - folded_backbone / kept_backbone
        print(f"{name:<10}{all_blocks:>14,}{str(taps):>14}{taps[-1] + 1:>13}{kept_backbone:>14,}{folded_backbone:>14,}"
              f"{saved:>14.1%}{head:>12,}")


if __name__ == "__main__":
    main()
