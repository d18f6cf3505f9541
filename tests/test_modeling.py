import copy
import math

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from helpers import random_labels, tiny_config

from modeling_dit_detection import DiTDetectionModel, DiTForObjectDetection
from modeling_dit_detection.modeling_dit_backbone import (
    DiTBackbone,
    alphas_cumprod,
    sincos_position_embedding,
    timestep_features,
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-latent"])
@pytest.mark.parametrize("height, width", [(64, 64), (32, 96)])
def test_output_shapes(preset, height, width):
    config = tiny_config(preset)
    model = DiTForObjectDetection(config).eval()
    pixel_values = torch.rand(2, 3, height, width) * 2 - 1
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)

    queries, labels = config.num_queries, config.num_labels
    assert outputs.logits.shape == (2, queries, labels)
    assert outputs.pred_boxes.shape == (2, queries, 4)
    assert ((outputs.pred_boxes >= 0) & (outputs.pred_boxes <= 1)).all()
    assert outputs.init_reference_points.shape == (2, queries, 4)
    assert outputs.last_hidden_state.shape == (2, queries, config.d_model)
    tokens = (height // config.backbone_stride) * (width // config.backbone_stride)
    dit = config.backbone_config
    assert len(outputs.hidden_states) == dit.num_hidden_layers + 1
    assert all(h.shape == (2, tokens, dit.hidden_size) for h in outputs.hidden_states)
    assert outputs.loss is None and outputs.auxiliary_outputs is None  # every output splits per image


def test_auxiliary_outputs_come_with_the_loss():
    config = tiny_config()
    model = DiTForObjectDetection(config).train()
    outputs = model(torch.rand(2, 3, 64, 64) * 2 - 1, labels=random_labels(2, config.num_labels))
    assert len(outputs.auxiliary_outputs) == config.decoder_layers - 1
    assert outputs.auxiliary_outputs[0]["pred_boxes"].shape == (2, config.num_queries, 4)
    assert outputs.auxiliary_outputs[0]["logits"].shape == (2, config.num_queries, config.num_labels)


def test_base_model_output_shapes():
    config = tiny_config()
    model = DiTDetectionModel(config).eval()
    outputs = model(torch.zeros(1, 3, 64, 64))
    assert outputs.intermediate_hidden_states.shape == (1, config.decoder_layers, config.num_queries, config.d_model)
    assert outputs.intermediate_reference_points.shape == (1, config.decoder_layers, config.num_queries, 4)
    assert outputs.init_reference_points.shape == (1, config.num_queries, 4)
    tokens = sum(int(16 * scale) ** 2 for scale in config.pyramid_scales)  # 16 x 16 tokens at stride 4
    assert outputs.enc_outputs_class.shape == (1, tokens, config.num_labels)
    assert outputs.enc_outputs_boxes.shape == (1, tokens, 4)
    assert outputs.hidden_states is None


def test_training_runs_all_query_groups_but_returns_the_first():
    config = tiny_config(num_query_groups=3)
    model = DiTDetectionModel(config).train()
    outputs = model(torch.zeros(1, 3, 64, 64))
    assert outputs.intermediate_reference_points.shape[2] == 3 * config.num_queries
    detector = DiTForObjectDetection(config).train()
    outputs = detector(torch.zeros(1, 3, 64, 64), labels=random_labels(1, config.num_labels))
    assert outputs.logits.shape[1] == config.num_queries


def test_lite_refinement_corrects_the_proposals_at_every_layer():
    """`box_refinement="lite"` (LW-DETR): every decoder layer samples around the selected proposals and its boxes are
    a correction of them, not of the previous layer's boxes."""
    from modeling_dit_detection.modeling_dit_detection import update_boxes

    config = tiny_config(box_refinement="lite", decoder_layers=3)
    model = DiTDetectionModel(config).eval()
    for head in model.decoder.box_heads:  # non-zero corrections, so that iterative and lite would differ
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64) * 2 - 1)
    hidden, boxes = outputs.intermediate_hidden_states, outputs.intermediate_reference_points
    for layer, head in enumerate(model.decoder.box_heads):
        expected = update_boxes(outputs.init_reference_points, head(hidden[:, layer]), config.box_update)
        torch.testing.assert_close(boxes[:, layer], expected)


def test_outputs_do_not_depend_on_the_rest_of_the_batch():
    model = DiTForObjectDetection(tiny_config("tiny-latent")).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
    torch.testing.assert_close(together.pred_boxes[1:2], alone.pred_boxes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.logits[1:2], alone.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-latent"])
def test_loss_is_finite_and_reaches_every_trainable_parameter(preset):
    config = tiny_config(preset)
    model = DiTForObjectDetection(config).train()
    images = torch.rand(3, 3, *config.image_size) * 2 - 1
    labels = random_labels(3, config.num_labels, boxes_per_image=(2, 0, 1))  # image 1 has no objects
    outputs = model(images, labels=labels)
    assert torch.isfinite(outputs.loss)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_dec_0", "loss_class_proposals"} <= set(outputs.loss_dict)

    # Zero-initialised output layers (box refinements start as "no change") block gradients to the layers before
    # them on the very first step only; after one update every trainable parameter must receive a gradient.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model(images, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("model.backbone.vae."):
            assert not parameter.requires_grad and parameter.grad is None, name
            continue
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def _assert_designed_head_init(model):
    prior_logit = -math.log(99)  # every class starts at probability 0.01
    heads = [*model.class_heads, model.model.proposal_class_head]
    assert all(torch.allclose(head.bias, torch.full_like(head.bias, prior_logit)) for head in heads)
    box_outputs = [*(head.layers[-1] for head in model.model.decoder.box_heads), model.model.proposal_box_head.layers[-1]]
    assert all(layer.weight.abs().max() == 0 and layer.bias.abs().max() == 0 for layer in box_outputs)
    attention = model.model.decoder.layers[0].cross_attn
    assert attention.sampling_offsets.weight.abs().max() == 0 and attention.attention_weights.weight.abs().max() == 0
    assert attention.sampling_offsets.bias[:4].tolist() == [1.0, 0.0, 2.0, 0.0]  # head 0 samples along +x


def test_a_new_detector_starts_from_its_designed_initialisation():
    # transformers skips `_init_weights` on parameter-less modules of models outside the library; the detector's
    # special cases (focal-loss prior, "no correction" box layers, deformable sampling grid) must still apply.
    config = tiny_config()
    model = DiTForObjectDetection(config)
    _assert_designed_head_init(model)
    with torch.no_grad():
        outputs = model.eval()(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert torch.allclose(outputs.pred_boxes, outputs.init_reference_points, atol=1e-6)  # no refinement yet
    assert outputs.logits.sigmoid().max() < 0.05


def test_a_new_dit_starts_from_dits_own_initialisation():
    """DiT's models.py: block Linears xavier-uniform with zero bias, the patch embedding xavier-uniform as a Linear,
    adaLN-Zero modulation (every block the identity); also for a folded block and a backbone built on its own."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, num_attention_heads=4)
    for backbone in (DiTForObjectDetection(config).model.backbone, DiTBackbone(config.backbone_config)):
        hidden = backbone.config.hidden_size
        for block in backbone.layers:
            assert not block.adaln_modulation.weight.any() and not block.adaln_modulation.bias.any()
            for layer, (fan_in, fan_out) in ((block.attention.q_proj, (hidden, hidden)),
                                             (block.mlp.fc1, (hidden, 4 * hidden)),
                                             (block.mlp.fc2, (4 * hidden, hidden))):
                bound = math.sqrt(6 / (fan_in + fan_out))
                assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
                assert not layer.bias.any()
        patch = backbone.patch_embed.weight
        bound = math.sqrt(6 / (patch[0].numel() + hidden))
        assert bound * 0.9 < patch.abs().max() <= bound and not backbone.patch_embed.bias.any()
        with torch.no_grad():
            states = backbone(torch.rand(1, 3, 64, 64) * 2 - 1, output_hidden_states=True).hidden_states
        assert all(torch.equal(states[0], state) for state in states[1:])  # adaLN-Zero: every block the identity
    folded = tiny_config(fold_conditioning=True)
    assert all(not block.modulation.any() for block in DiTForObjectDetection(folded).model.backbone.layers)


def test_heads_reinitialised_for_new_labels_get_the_designed_initialisation(tmp_path):
    DiTForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    model = DiTForObjectDetection.from_pretrained(tmp_path, num_labels=7, ignore_mismatched_sizes=True)
    assert model.class_heads[0].out_features == 7
    _assert_designed_head_init(model)


def test_backbone_blocks_after_the_deepest_tap_are_skipped_unless_states_are_requested():
    config = tiny_config(out_indices=(2,))  # the output of block 1 (stage 2)
    model = DiTForObjectDetection(config).train()
    model(torch.zeros(1, 3, 64, 64), labels=random_labels(1, config.num_labels)).loss.backward()
    assert model.model.backbone.layers[1].mlp.fc2.weight.grad is not None
    assert model.model.backbone.layers[3].mlp.fc2.weight.grad is None


def test_sdpa_and_eager_attention_agree():
    eager = DiTForObjectDetection._from_config(tiny_config(), attn_implementation="eager").eval()
    sdpa = DiTForObjectDetection._from_config(tiny_config(), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        eager_states = eager(images, output_hidden_states=True).hidden_states
        sdpa_states = sdpa(images, output_hidden_states=True).hidden_states
    for a, b in zip(eager_states, sdpa_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(num_query_groups=1)
    labels = random_labels(2, config.num_labels)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DiTForObjectDetection(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(images, labels=labels).loss.backward()
        grads.append(model.model.backbone.layers[0].attention.q_proj.weight.grad.clone())
    assert model.model.backbone.layers[0].gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("grid", [(16, 16), (8, 12), (24, 10)])
def test_sincos_positions_match_diffusers(grid):
    ours = sincos_position_embedding(64, *grid, base_grid_size=16)
    reference = get_2d_sincos_pos_embed(64, grid, base_size=16, output_type="pt").float()
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_features_match_diffusers(shift):
    timesteps = torch.tensor([0, 1, 100, 999])
    reference = get_timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
    torch.testing.assert_close(timestep_features(timesteps, 256, shift), reference)


def test_vae_latents_are_the_scaled_posterior_mean_of_diffusers_autoencoder():
    config = tiny_config("tiny-latent")
    model = DiTDetectionModel(config).eval()
    vae_config = config.backbone_config.vae_config
    autoencoder = AutoencoderKL(**{k: v for k, v in vae_config.items() if k != "scaling_factor"}).eval()
    encoder_weights = {k: v for k, v in autoencoder.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    model.backbone.vae.load_state_dict(encoder_weights)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reference = autoencoder.encode(images).latent_dist.mean * vae_config["scaling_factor"]
        torch.testing.assert_close(model.backbone.vae(images), reference, atol=1e-6, rtol=1e-5)


def test_features_use_fixed_noise_at_the_feature_timestep():
    config = tiny_config(feature_timestep=250)
    model = DiTDetectionModel(config)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    first, second = model.backbone.diffusion_input(images), model.backbone.diffusion_input(images)
    torch.testing.assert_close(first, second)
    signal_rate = alphas_cumprod(config.backbone_config)[250].item()
    noise = (first - signal_rate**0.5 * images) / (1 - signal_rate) ** 0.5
    assert 0.8 < noise.std() < 1.2  # unit Gaussian noise was added at the DDPM rate of t = 250
    clean = DiTDetectionModel(tiny_config(feature_timestep=0))
    torch.testing.assert_close(clean.backbone.diffusion_input(images), images)


def test_frozen_vae_stays_frozen_after_reload(tmp_path):
    DiTForObjectDetection(tiny_config("tiny-latent")).save_pretrained(tmp_path)
    model = DiTForObjectDetection.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in model.model.backbone.vae.parameters())


def test_input_size_not_a_multiple_of_the_stride_is_rejected():
    model = DiTForObjectDetection(tiny_config("tiny-latent"))
    with pytest.raises(ValueError, match=r"30x32 .* not a multiple of the backbone stride 4"):
        model(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model(torch.zeros(1, 1, 32, 32))


def test_too_few_pyramid_tokens_for_the_queries_is_rejected():
    model = DiTForObjectDetection(tiny_config(num_queries=500))
    with pytest.raises(ValueError, match="fewer than num_queries=500"):
        model(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize(
    "labels, message",
    [
        ([{"class_labels": torch.tensor([0])}], r"labels\[0\].*boxes"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 1.5, 0.2]])}], r"labels\[0\]"),
        ([{"class_labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}], r"labels\[0\]"),
        ([{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}], r"labels\[0\]"),
        ({"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, "list"),
    ],
)
def test_malformed_labels_are_rejected_with_a_clear_error(labels, message):
    model = DiTForObjectDetection(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, 64, 64), labels=labels)


def test_noise_schedule_matches_diffusers_linear_ddpm():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(alphas_cumprod(tiny_config().backbone_config).float(), scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["logit", "relative"])
def test_update_boxes_without_a_correction_keeps_the_reference(mode):
    from modeling_dit_detection.modeling_dit_detection import update_boxes

    reference = torch.tensor([[0.3, 0.6, 0.1, 0.2], [0.5, 0.5, 0.4, 0.05]])
    torch.testing.assert_close(update_boxes(reference, torch.zeros(2, 4), mode), reference, atol=1e-5, rtol=1e-5)


def test_relative_box_update_moves_in_units_of_the_box_and_scales_its_size():
    from modeling_dit_detection.modeling_dit_detection import update_boxes

    reference = torch.tensor([[0.3, 0.6, 0.1, 0.2]])
    moved = update_boxes(reference, torch.tensor([[1.0, -0.5, math.log(2.0), 0.0]]), "relative")
    torch.testing.assert_close(moved, torch.tensor([[0.4, 0.5, 0.2, 0.2]]))
    # a huge size delta stays finite (capped), also in bf16
    huge = update_boxes(reference.bfloat16(), torch.full((1, 4), 1e4).bfloat16(), "relative")
    assert torch.isfinite(huge).all()


def test_proposal_anchors_sit_on_the_tokens_with_the_configured_size():
    """Legacy anchors are 0.05 x 2^level of the image whatever the grid; `anchor_tokens` sizes them in tokens of their
    level, per axis for a non-square grid."""
    from modeling_dit_detection.modeling_dit_detection import _token_anchors

    shapes = [(4, 8), (2, 4)]
    legacy = _token_anchors(shapes, None, "cpu", torch.float32)
    assert legacy.shape == (4 * 8 + 2 * 4, 4)
    torch.testing.assert_close(legacy[0], torch.tensor([1 / 16, 1 / 8, 0.05, 0.05]))
    torch.testing.assert_close(legacy[-1], torch.tensor([7 / 8, 3 / 4, 0.1, 0.1]))
    sized = _token_anchors(shapes, 2.0, "cpu", torch.float32)
    torch.testing.assert_close(sized[:, :2], legacy[:, :2])
    torch.testing.assert_close(sized[0, 2:], torch.tensor([2 / 8, 2 / 4]))
    torch.testing.assert_close(sized[-1, 2:], torch.tensor([2 / 4, 2 / 2]))
    # the proposals start on them (zero-initialised box head), in either box update
    for mode in ("logit", "relative"):
        model = DiTForObjectDetection(tiny_config(anchor_tokens=2.0, box_update=mode)).eval()
        with torch.no_grad():
            boxes = model.model(torch.zeros(1, 3, 64, 64)).enc_outputs_boxes[0]
        shapes = [(int(16 * s), int(16 * s)) for s in model.config.pyramid_scales]
        torch.testing.assert_close(boxes, _token_anchors(shapes, 2.0, "cpu", torch.float32), atol=1e-5, rtol=1e-5)


def test_neck_blocks_start_as_the_identity_and_then_learn():
    """A detector with `neck_blocks` has that many residual bottlenecks per pyramid level; new ones leave the pyramid
    exactly as without them (their last convolution starts at zero), and they receive gradients."""
    from modeling_dit_detection.modeling_dit_detection import NeckBlock

    torch.manual_seed(0)
    plain = DiTForObjectDetection(tiny_config())
    torch.manual_seed(0)
    with_blocks = DiTForObjectDetection(tiny_config(neck_blocks=2))
    blocks = [m for m in with_blocks.model.neck.modules() if isinstance(m, NeckBlock)]
    assert len(blocks) == 2 * len(with_blocks.config.pyramid_scales)
    missing = with_blocks.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".levels." in key for key in missing)
    features = [torch.randn(2, 32, 16, 16) for _ in plain.config.backbone_config.out_indices]
    for a, b in zip(plain.model.neck(features), with_blocks.model.neck(features)):
        torch.testing.assert_close(a, b)
    with_blocks.train()
    with_blocks(torch.randn(2, 3, 64, 64), labels=random_labels(2, 3)).loss.backward()
    assert all(block.expand.weight.grad.abs().sum() > 0 for block in blocks)


@pytest.mark.parametrize("hidden_size, num_attention_heads", [(32, 2), (1024, 2)])
def test_c2f_neck_gives_every_pyramid_level_from_each_tap_and_learns(hidden_size, num_attention_heads):
    """`neck="c2f"`: one `[B, d_model, h * s, w * s]` map per scale s (odd grids rounded up, as the simple neck), each
    from every tap; taps wider than 512 channels are reduced before upsampling (LW-DETR's rule); BatchNorm or
    LayerNorm in the convolutions; every parameter gets a gradient from the detection loss."""
    from modeling_dit_detection.modeling_dit_detection import CrossStagePartialNeck

    for norm, norm_class in (("batch", torch.nn.BatchNorm2d), ("layer", torch.nn.LayerNorm)):
        config = tiny_config(neck="c2f", neck_blocks=1, neck_norm=norm, pyramid_scales=(4, 2, 1, 0.5, 0.25),
                             hidden_size=hidden_size, num_attention_heads=num_attention_heads)
        neck = CrossStagePartialNeck(config)
        assert any(isinstance(m, norm_class) for m in neck.levels[0]["mix"].modules())
        taps = [torch.randn(2, hidden_size, 7, 9) for _ in config.backbone_config.out_indices]
        shapes = [tuple(level.shape) for level in neck(taps)]
        assert shapes == [(2, config.d_model, 28, 36), (2, config.d_model, 14, 18), (2, config.d_model, 7, 9),
                          (2, config.d_model, 4, 5), (2, config.d_model, 2, 3)]
        # channels per tap after x4 and x2: each x2 step halves them, or quarters them while they are over 512
        split_inputs = [level["mix"].split[0].in_channels // len(taps) for level in neck.levels]
        expected = [hidden_size // 8, hidden_size // 4] if hidden_size > 512 else [hidden_size // 4, hidden_size // 2]
        assert split_inputs == [*expected, hidden_size, hidden_size, hidden_size]

    model = DiTForObjectDetection(tiny_config(neck="c2f", neck_blocks=1)).train()
    model(torch.randn(2, 3, 64, 64), labels=random_labels(2, 3)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.neck.parameters())


@pytest.mark.parametrize("neck", ["simple", "c2f"])
def test_neck_convolution_weights_are_channels_last_when_built_and_loaded(tmp_path, neck):
    """The neck's convolution weights take the taps' channels-last layout (no conversion per call), in a new and in a
    reloaded detector (loading replaces the parameters), and the layout does not change what the neck computes."""
    def neck_weights(model):
        return [p for p in model.model.neck.parameters() if p.dim() == 4]

    torch.manual_seed(0)
    model = DiTForObjectDetection(tiny_config(neck=neck, neck_blocks=1)).eval()
    model.save_pretrained(tmp_path)
    loaded = DiTForObjectDetection.from_pretrained(tmp_path).eval()
    for detector in (model, loaded):
        assert neck_weights(detector) and all(w.is_contiguous(memory_format=torch.channels_last)
                                              for w in neck_weights(detector))
    channels_first = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert all(w.is_contiguous() for w in neck_weights(channels_first))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = channels_first(pixels)
        for detector in (model, loaded):
            torch.testing.assert_close(detector(pixels).pred_boxes, expected.pred_boxes, rtol=1e-5, atol=1e-5)


def test_c2f_detector_round_trips_with_its_batch_norm_statistics(tmp_path):
    """BatchNorm's running statistics are part of the saved model: the reloaded detector predicts identically."""
    torch.manual_seed(0)
    model = DiTForObjectDetection(tiny_config(neck="c2f", neck_blocks=1)).train()
    for _ in range(2):  # move the running statistics away from their initial values
        model(torch.randn(4, 3, 64, 64), labels=random_labels(4, 3))
    model.eval().save_pretrained(tmp_path)
    loaded = DiTForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.neck == "c2f" and loaded.config.neck_norm == "batch"
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected, actual = model(pixels), loaded(pixels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=0, atol=0)
    mean = model.model.neck.levels[0]["mix"].split[1].running_mean
    assert mean.abs().sum() > 0 and torch.equal(loaded.model.neck.levels[0]["mix"].split[1].running_mean, mean)
