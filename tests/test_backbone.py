"""The DiT as a transformers backbone: AutoBackbone, feature maps equal to the detector's, inside transformers' DETR."""

import torch
from helpers import random_labels, tiny_config
from transformers import AutoBackbone, DetrConfig, DetrForObjectDetection

from modeling_dit_detection import DiTBackboneConfig, DiTBackboneModel, DiTForObjectDetection


def _tiny_backbone_config(**overrides) -> DiTBackboneConfig:
    config = tiny_config()
    fields = {key: getattr(config, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "patch_size", "in_channels", "vae_config", "image_size",
                                                    "frequency_embedding_size", "num_class_embeds")}
    return DiTBackboneConfig(**{**fields, **overrides})


def test_auto_backbone_gives_feature_maps_of_the_chosen_stages():
    config = _tiny_backbone_config(out_features=["stem", "stage2", "stage4"])
    backbone = AutoBackbone.from_config(config)
    assert isinstance(backbone, DiTBackboneModel)
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert backbone.out_indices == [0, 2, 4] and backbone.channels == [32, 32, 32]
    outputs = backbone(torch.randn(2, 3, 64, 96))  # non-square: 16 x 24 tokens at stride 4
    assert [tuple(f.shape) for f in outputs.feature_maps] == [(2, 32, 16, 24)] * 3
    assert outputs.hidden_states is None
    assert len(backbone(torch.randn(1, 3, 64, 64), output_hidden_states=True).hidden_states) == 5


def test_backbone_of_a_detector_gives_the_detectors_block_outputs(tmp_path):
    detector = DiTForObjectDetection(tiny_config("tiny-latent")).eval()
    backbone = DiTBackboneModel.from_detector(detector).eval()
    assert backbone.out_features == [f"stage{i + 1}" for i in detector.config.out_indices]
    pixel_values = torch.rand(1, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        states = detector.model(pixel_values, output_hidden_states=True).hidden_states
        maps = backbone(pixel_values).feature_maps
    grid = (32 // detector.config.backbone_stride, 64 // detector.config.backbone_stride)
    for index, feature_map in zip(detector.config.out_indices, maps):
        expected = states[index + 1].transpose(1, 2).reshape(1, -1, *grid)
        torch.testing.assert_close(feature_map, expected, rtol=0, atol=0)

    # Saved on its own, it loads (VAE frozen again) and gives the same maps. (transformers 5's
    # `AutoBackbone.from_pretrained` asks the Hub whether the name is a repo before anything else, so it cannot
    # load a local folder offline; the class's own `from_pretrained` can.)
    backbone.save_pretrained(tmp_path)
    reloaded = DiTBackboneModel.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for p in reloaded.vae.parameters())
    with torch.no_grad():
        for a, b in zip(reloaded(pixel_values).feature_maps, maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_transformers_detr_trains_on_dit_features():
    config = DetrConfig(backbone_config=_tiny_backbone_config(out_features=["stage4"]).to_dict(),
                        use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_queries=8, num_labels=3)
    model = DetrForObjectDetection(config).train()
    assert isinstance(model.model.backbone.model, DiTBackboneModel)
    labels = [{"class_labels": label["class_labels"], "boxes": label["boxes"]} for label in random_labels(2, 3)]
    outputs = model(pixel_values=torch.rand(2, 3, 64, 64) * 2 - 1, labels=labels)
    assert outputs.logits.shape == (2, 8, 4) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    dit = model.model.backbone.model.backbone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.layers[-1].parameters())


def test_negative_out_indices_count_from_the_last_stage():
    backbone = AutoBackbone.from_config(_tiny_backbone_config(out_indices=[-1])).eval()
    pixel_values = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        outputs = backbone(pixel_values, output_hidden_states=True)
        (last,) = backbone(pixel_values).feature_maps
    torch.testing.assert_close(last, outputs.hidden_states[-1].transpose(1, 2).reshape(1, 32, 16, 16))
    torch.testing.assert_close(outputs.feature_maps[0], last)


def test_a_model_cast_to_bfloat16_takes_float32_pixels():
    detector = DiTForObjectDetection(tiny_config()).to(torch.bfloat16).eval()  # what --bf16_full_eval does
    with torch.no_grad():
        outputs = detector(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert outputs.logits.dtype == torch.bfloat16 and torch.isfinite(outputs.pred_boxes.float()).all()
