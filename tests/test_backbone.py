"""The DiT backbone: one class for the detector and for `AutoBackbone`, stages with one meaning, feature maps equal to
the blocks' outputs, inside transformers' own DETR, and backbones saved before version 0.2."""

import pytest
import torch
from helpers import random_labels, tiny_config
from transformers import AutoBackbone, DetrConfig, DetrForObjectDetection

from modeling_dit_detection import DiTBackbone, DiTBackboneConfig, DiTForObjectDetection


def _tiny_backbone_config(**overrides) -> DiTBackboneConfig:
    fields = tiny_config().backbone_config.to_dict()
    fields.pop("out_features"), fields.pop("out_indices")
    return DiTBackboneConfig(**{**fields, **overrides})


def test_auto_backbone_gives_feature_maps_of_the_chosen_stages():
    config = _tiny_backbone_config(out_features=["stem", "stage2", "stage4"])
    backbone = AutoBackbone.from_config(config)
    assert isinstance(backbone, DiTBackbone)
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert backbone.out_indices == [0, 2, 4] and backbone.channels == [32, 32, 32]
    outputs = backbone(torch.randn(2, 3, 64, 96))  # non-square: 16 x 24 tokens at stride 4
    assert [tuple(f.shape) for f in outputs.feature_maps] == [(2, 32, 16, 24)] * 3
    assert outputs.hidden_states is None
    assert len(backbone(torch.randn(1, 3, 64, 64), output_hidden_states=True).hidden_states) == 5


def test_the_detector_reads_its_backbones_feature_maps(tmp_path):
    detector = DiTForObjectDetection(tiny_config("tiny-latent")).eval()
    backbone = detector.model.backbone
    assert isinstance(backbone, DiTBackbone) and backbone.config is detector.config.backbone_config
    assert backbone.out_features == ["stage2", "stage4"] and backbone.out_indices == [2, 4]
    pixel_values = torch.rand(1, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        states = detector.model(pixel_values, output_hidden_states=True).hidden_states
        maps = backbone(pixel_values).feature_maps
    grid = (32 // backbone.config.backbone_stride, 64 // backbone.config.backbone_stride)
    for stage, feature_map in zip(backbone.out_indices, maps):  # stage i = the output of block i
        expected = states[stage].transpose(1, 2).reshape(1, -1, *grid)
        torch.testing.assert_close(feature_map, expected, rtol=0, atol=0)

    # Saved on its own, it loads (VAE frozen again) and gives the same maps. (transformers 5's
    # `AutoBackbone.from_pretrained` asks the Hub whether the name is a repo before anything else, so it cannot
    # load a local folder offline; the class's own `from_pretrained` can.)
    backbone.save_pretrained(tmp_path)
    reloaded = DiTBackbone.from_pretrained(tmp_path).eval()
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
    dit = model.model.backbone.model
    assert isinstance(dit, DiTBackbone)
    labels = [{"class_labels": label["class_labels"], "boxes": label["boxes"]} for label in random_labels(2, 3)]
    outputs = model(pixel_values=torch.rand(2, 3, 64, 64) * 2 - 1, labels=labels)
    assert outputs.logits.shape == (2, 8, 4) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    # Gradients reach the DiT: a new block is the identity (adaLN-Zero), so at the first step its modulation and the
    # patch embedding below it get them (its attention and MLP from the next step on, once the gates open).
    for parameter in (*dit.layers[-1].adaln_modulation.parameters(), *dit.patch_embed.parameters()):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_negative_out_indices_count_from_the_last_stage():
    config = _tiny_backbone_config(out_indices=[-1])
    assert config.out_indices == [4] and config.out_features == ["stage4"]
    backbone = AutoBackbone.from_config(config).eval()
    pixel_values = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        outputs = backbone(pixel_values, output_hidden_states=True)
        (last,) = backbone(pixel_values).feature_maps
    torch.testing.assert_close(last, outputs.hidden_states[-1].transpose(1, 2).reshape(1, 32, 16, 16))
    torch.testing.assert_close(outputs.feature_maps[0], last)


@pytest.mark.parametrize("out_indices", [[5], [-6], [3, 1], [2, 2]])
def test_out_indices_outside_or_out_of_order_are_rejected(out_indices):
    with pytest.raises(ValueError, match="out_indices"):
        _tiny_backbone_config(out_indices=out_indices)


def test_a_model_cast_to_bfloat16_takes_float32_pixels():
    detector = DiTForObjectDetection(tiny_config()).to(torch.bfloat16).eval()  # what --bf16_full_eval does
    with torch.no_grad():
        outputs = detector(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert outputs.logits.dtype == torch.bfloat16 and torch.isfinite(outputs.pred_boxes.float()).all()


def test_gelu_tanh_is_torchs_tanh_gelu_in_inference_and_in_training():
    from modeling_dit_detection.modeling_dit_backbone import gelu_tanh

    extremes = torch.tensor([-1e20, -50.0, 0.0, 50.0, 1e20])
    values = torch.cat([torch.linspace(-12, 12, 4001), torch.randn(4000) * 3, extremes])
    reference = torch.nn.functional.gelu(values.double(), approximate="tanh")
    with torch.no_grad():  # float32 on a CPU without gradient: the x sigmoid(2u) form
        fast = gelu_tanh(values)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast, torch.nn.functional.gelu(values, approximate="tanh"), rtol=2e-6, atol=1e-6)

    tracked = values.clone().requires_grad_()
    gelu_tanh(tracked).sum().backward()
    expected = values.clone().requires_grad_()
    torch.nn.functional.gelu(expected, approximate="tanh").sum().backward()
    torch.testing.assert_close(tracked.grad, expected.grad, rtol=0, atol=0, equal_nan=True)  # the same kernel
    with torch.no_grad():  # bfloat16: torch's kernel, which computes in float32 inside
        halves = values.bfloat16()
        assert torch.equal(gelu_tanh(halves), torch.nn.functional.gelu(halves, approximate="tanh"))


def test_modulated_layer_norm_is_norm_then_dit_modulation_with_gradients():
    from modeling_dit_detection.modeling_dit_backbone import modulated_layer_norm

    generator = torch.Generator().manual_seed(0)
    leaves = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
              for shape in [(2, 5, 8), (1, 1, 8), (1, 1, 8)]]
    hidden, shift, scale = leaves
    ours = modulated_layer_norm(hidden, shift, scale, eps=1e-6)
    explicit = torch.nn.functional.layer_norm(hidden, (8,), eps=1e-6) * (1 + scale) + shift  # DiT's models.py
    torch.testing.assert_close(ours, explicit)
    weights = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    ours_grads = torch.autograd.grad((ours * weights).sum(), leaves)
    explicit_grads = torch.autograd.grad((explicit * weights).sum(), leaves)
    for got, expected in zip(ours_grads, explicit_grads):
        torch.testing.assert_close(got, expected)
