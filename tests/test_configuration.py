"""Configs: every preset builds and runs, every validation branch answers with its message, detectors saved before the
backbone had its own config (version 0.1) load and resave in today's format."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from modeling_dit_detection import (
    DETECTOR_PRESETS,
    DIT_PRESETS,
    DiTBackboneConfig,
    DiTDetectionConfig,
    DiTDetectionModel,
    DiTForObjectDetection,
)

LEGACY_DETECTOR = Path(__file__).parent / "fixtures" / "detector-v0.1"  # saved by the code of commit f99674a


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_every_dit_preset_builds_with_taps_that_follow_its_depth(name):
    config = DiTDetectionConfig.from_preset(name)
    depth = config.backbone_config.num_hidden_layers
    taps = config.backbone_config.out_indices
    assert len(taps) == 3 and depth / 2 <= taps[0] < taps[-1] <= 0.75 * depth
    with torch.device("meta"):
        model = DiTDetectionModel(config)
    assert len(model.backbone.layers) == depth
    assert model.neck.fuse.in_features == 3 * config.backbone_config.hidden_size


@pytest.mark.parametrize("name", list(DETECTOR_PRESETS))
def test_every_detector_preset_runs_a_forward_pass(name):
    config = DiTDetectionConfig.from_preset(name, id2label={0: "a", 1: "b"})
    model = DiTForObjectDetection(config).eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, *config.image_size) * 2 - 1)
    assert outputs.logits.shape == (1, config.num_queries, 2) and torch.isfinite(outputs.pred_boxes).all()


def test_preset_overrides_go_to_the_backbone_or_the_detector():
    config = DiTDetectionConfig.from_preset("DiT-S/2", out_indices=[4, 8], feature_timestep=25, image_size=512,
                                            num_queries=100)
    assert config.backbone_config.out_features == ["stage4", "stage8"]
    assert config.backbone_config.feature_timestep == 25 and config.image_size == [512, 512]
    assert config.num_queries == 100 and config.backbone_config.base_grid_size == 32
    with pytest.raises(ValueError, match="Unknown preset 'DiT-XXL/2'"):
        DiTDetectionConfig.from_preset("DiT-XXL/2")
    with pytest.raises(ValueError, match="builds the backbone_config"):
        DiTDetectionConfig.from_preset("tiny", backbone_config={})


def test_config_round_trips_through_json(tmp_path):
    config = DiTDetectionConfig.from_preset("tiny-latent", id2label={0: "a", 1: "b"}, category_ids=[3, 7])
    config.save_pretrained(tmp_path)
    reloaded = DiTDetectionConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert isinstance(reloaded.backbone_config, DiTBackboneConfig) and reloaded.category_ids == [3, 7]
    stored = json.loads((tmp_path / "config.json").read_text())
    assert "hidden_size" not in stored and stored["backbone_config"]["out_indices"] == [2, 4]


def test_image_size_is_the_backbones_and_is_checked_when_set():
    config = DiTDetectionConfig.from_preset("tiny")
    config.image_size = (32, 96)
    assert config.backbone_config.image_size == [32, 96] and config.backbone_config.base_grid_size == 16
    with pytest.raises(ValueError, match="not a positive multiple of the backbone stride 4"):
        config.image_size = 30


BACKBONE_ERRORS = [
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_attention_heads": 1.5}, "num_attention_heads must be a positive integer"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "not divisible by num_attention_heads"),
    ({"hidden_size": 6, "num_attention_heads": 2}, "multiple of 4 for 2-D sin-cos"),
    ({"vae_config": {"latent_channels": 4}}, "vae_config must be a diffusers AutoencoderKL config"),
    ({"in_channels": 3}, r"in_channels 3 != the VAE's latent_channels 4"),
    ({"vae_config": None}, "pixel-space DiT .* in_channels must be 3"),
    ({"image_size": (250, 256)}, "not a positive multiple of the backbone stride 16"),
    ({"image_size": (1, 2, 3)}, "image_size must be an int or"),
    ({"feature_timestep": 1000}, r"feature_timestep 1000 must lie in \[0, 1000\)"),
    ({"beta_start": 0.03}, "0 < beta_start < beta_end < 1"),
    ({"base_grid_size": 0}, "base_grid_size must be >= 1"),
    ({"out_indices": [29]}, "must index the 29 stages"),
    ({"out_features": ["stage30"]}, "out_features must be a subset of stage_names"),
]


@pytest.mark.parametrize("fields, message", BACKBONE_ERRORS)
def test_backbone_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        DiTBackboneConfig(**fields)


DETECTOR_ERRORS = [
    ({"d_model": 0}, "d_model must be a positive integer"),
    ({"num_queries": True}, "num_queries must be a positive integer"),
    ({"num_query_groups": 0}, "num_query_groups must be a positive integer"),
    ({"d_model": 30, "decoder_attention_heads": 4}, "not divisible by decoder_attention_heads"),
    ({"d_model": 24, "decoder_attention_heads": 8}, "must be even"),
    ({"pyramid_scales": []}, "at least one level"),
    ({"pyramid_scales": [3.0]}, "must be 4, 2, 1, 0.5 or 0.25"),
    ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
    ({"focal_alpha": 0.0}, "focal_alpha must lie in"),
    ({"box_update": "sigmoid"}, "box_update must be one of"),
    ({"neck_blocks": -1}, "neck_blocks must be an integer >= 0"),
    ({"neck": "fpn"}, r"neck must be one of \('simple', 'c2f'\)"),
    ({"neck": "c2f", "neck_norm": "group"}, r"neck_norm must be one of \('batch', 'layer'\)"),
    ({"anchor_tokens": 0}, "anchor_tokens must be > 0"),
    ({"box_refinement": "deep"}, "box_refinement must be one of"),
    ({"class_loss": "softmax"}, "class_loss must be one of"),
    ({"giou_cost": -1.0}, "giou_cost must be >= 0"),
    ({"category_ids": [1, 1]}, "one distinct dataset id per label"),
    ({"backbone_config": "DiT-XL/2"}, "must be a DiTBackboneConfig or a dict"),
    ({"hidden_size": 384}, r"belong in backbone_config=DiTBackboneConfig"),
    ({"hidden_size": 384, "backbone_config": {}}, "were given next to backbone_config"),
]


@pytest.mark.parametrize("fields, message", DETECTOR_ERRORS)
def test_detector_config_errors(fields, message):
    fields = {"id2label": {0: "a", 1: "b"}, **fields}
    with pytest.raises(ValueError, match=message):
        DiTDetectionConfig(**fields)


ACROSS_MACHINES = {"rtol": 1e-5, "atol": 1e-6}


def test_a_detector_saved_before_version_0_2_loads_with_identical_outputs(tmp_path):
    stored = json.loads((LEGACY_DETECTOR / "config.json").read_text())
    assert "backbone_config" not in stored and stored["out_indices"] == [1, 3]  # blocks, flat: the old format
    model = DiTForObjectDetection.from_pretrained(LEGACY_DETECTOR).eval()
    assert model.config.backbone_config.out_indices == [2, 4]  # the same blocks, as stages
    expected = torch.load(LEGACY_DETECTOR / "expected_outputs.pt")
    with torch.no_grad():
        outputs = model(expected["pixel_values"])
    # The stored outputs were computed on another CPU: its matmul kernels round differently (4e-8 seen on an AMD EPYC
    # against the Intel Xeon that stored them); a wrongly loaded weight changes them by orders of magnitude more.
    torch.testing.assert_close(outputs.logits, expected["logits"], **ACROSS_MACHINES)
    torch.testing.assert_close(outputs.pred_boxes, expected["pred_boxes"], **ACROSS_MACHINES)
    assert not any(p.requires_grad for p in model.model.backbone.vae.parameters())

    # Saved again, it is in today's format: nested config, the VAE's weights inside the backbone.
    model.save_pretrained(tmp_path)
    assert "backbone_config" in json.loads((tmp_path / "config.json").read_text())
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert any(key.startswith("model.backbone.vae.") for key in keys)
    assert not any(key.startswith("model.vae.") for key in keys)
    with torch.no_grad():
        again = DiTForObjectDetection.from_pretrained(tmp_path).eval()(expected["pixel_values"])
    torch.testing.assert_close(again.logits, expected["logits"], **ACROSS_MACHINES)


def test_box_update_and_class_loss_defaults_and_round_trip(tmp_path):
    """Defaults: the logit box update and the focal loss (weight 2), which every detector saved before these fields
    existed was trained with; a chosen value survives save/load."""
    config = DiTDetectionConfig.from_preset("tiny", id2label={0: "a", 1: "b"})
    assert (config.box_update, config.class_loss, config.class_loss_coefficient) == ("logit", "focal", 2.0)
    assert config.anchor_tokens is None and config.box_refinement == "iterative"
    DiTDetectionConfig.from_preset("tiny", id2label={0: "a", 1: "b"}, box_update="relative", class_loss="iou_aware",
                                   anchor_tokens=3, box_refinement="lite").save_pretrained(tmp_path)
    reloaded = DiTDetectionConfig.from_pretrained(tmp_path)
    assert (reloaded.box_update, reloaded.class_loss, reloaded.anchor_tokens) == ("relative", "iou_aware", 3.0)
    assert reloaded.box_refinement == "lite"
