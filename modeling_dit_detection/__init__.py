"""DiT for object detection: a pretrained Diffusion Transformer fine-tuned into a DETR-style detector.

Importing this package registers the classes with transformers' Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForObjectDetection`, `AutoImageProcessor` and `pipeline("object-detection")` resolve `dit_detection`,
and `AutoBackbone` resolves `dit_backbone` (the DiT as a backbone for other detectors). Only the inference files are
imported here; the training side is `modeling_dit_detection.training`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForObjectDetection,
    AutoVideoProcessor,
)

from .configuration_dit_backbone import DIT_PRESETS, SD_VAE_CONFIG, DiTBackboneConfig, default_out_indices
from .configuration_dit_detection import DETECTOR_PRESETS, PRESETS, DiTDetectionConfig
from .image_processing_dit_detection import DiTDetectionImageProcessor
from .loss_dit_detection import DiTDetectionCriterion, HungarianMatcher
from .modeling_dit_backbone import DiTBackbone
from .modeling_dit_detection import (
    DiTDetectionModel,
    DiTDetectionModelOutput,
    DiTDetectionObjectDetectionOutput,
    DiTForObjectDetection,
)

AutoConfig.register(DiTDetectionConfig.model_type, DiTDetectionConfig, exist_ok=True)
AutoModel.register(DiTDetectionConfig, DiTDetectionModel, exist_ok=True)
AutoModelForObjectDetection.register(DiTDetectionConfig, DiTForObjectDetection, exist_ok=True)
AutoConfig.register(DiTBackboneConfig.model_type, DiTBackboneConfig, exist_ok=True)
AutoBackbone.register(DiTBackboneConfig, DiTBackbone, exist_ok=True)
AutoImageProcessor.register(
    DiTDetectionConfig, image_processor_classes={"torchvision": DiTDetectionImageProcessor}, exist_ok=True
)
# No video processor. Without this entry, AutoVideoProcessor (which pipeline() tries for every model) derives one
# from the image processor's auto_map entry, finds remote code for it and asks whether to run it, although this
# package's own classes are in use.
AutoVideoProcessor.register(DiTDetectionConfig, video_processor_classes={}, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files next to the weights, so a saved folder
# loads with `trust_remote_code=True` where this package is not installed.
DiTDetectionConfig.register_for_auto_class()
DiTDetectionModel.register_for_auto_class("AutoModel")
DiTForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
DiTDetectionImageProcessor.register_for_auto_class("AutoImageProcessor")
DiTBackboneConfig.register_for_auto_class()
DiTBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "DETECTOR_PRESETS",
    "DIT_PRESETS",
    "PRESETS",
    "SD_VAE_CONFIG",
    "DiTBackbone",
    "DiTBackboneConfig",
    "DiTDetectionConfig",
    "DiTDetectionCriterion",
    "DiTDetectionImageProcessor",
    "DiTDetectionModel",
    "DiTDetectionModelOutput",
    "DiTDetectionObjectDetectionOutput",
    "DiTForObjectDetection",
    "HungarianMatcher",
    "default_out_indices",
]
