"""Loading diffusers DiT checkpoints: exact against diffusers' own activations, block by block."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from modeling_dit_detection import (
    SD_VAE_CONFIG,
    DiTDetectionConfig,
    DiTDetectionModel,
    DiTForObjectDetection,
    default_out_indices,
)
from modeling_dit_detection.convert_diffusers_dit import (
    backbone_state_dict_from_diffusers,
    checkpoint_kind,
    vae_encoder_state_dict_from_diffusers,
)

NUM_CLASSES = 10  # ImageNet-style class conditioning of the tiny DiT; the null class is 10
ID2LABEL = {0: "cat", 1: "dog", 2: "bird"}
# A small detection head, so that the tiny backbone's few pyramid tokens are enough for the queries.
HEAD = {"num_queries": 10, "num_query_groups": 2, "d_model": 32, "decoder_layers": 2, "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64}


def tiny_diffusers_dit(in_channels=4, sample_size=8, num_layers=3):
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
                                        out_channels=2 * in_channels, num_layers=num_layers, sample_size=sample_size,
                                        patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
    # A real DiT has one conditioning embedder, which diffusers copies into every block: make the copies equal.
    first = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    return transformer.eval()


def tiny_diffusers_vae():
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, sample_size=16).eval()


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dit-pipeline")
    DiTPipeline(transformer=tiny_diffusers_dit(), vae=tiny_diffusers_vae(),
                scheduler=DDPMScheduler(beta_schedule="linear")).save_pretrained(folder)
    return folder


def block_outputs_of_diffusers(transformer, latents, timestep):
    """diffusers' hidden states after every block (forward hooks), at `timestep` and the null class."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
             for block in transformer.transformer_blocks]
    null_class = torch.full((latents.shape[0],), NUM_CLASSES)
    try:
        with torch.no_grad():
            transformer(latents, timestep=torch.full((latents.shape[0],), timestep), class_labels=null_class)
    except RuntimeError:
        pass  # diffusers' unpatchify only handles square grids; the blocks have run by then
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("height, width", [(16, 16), (16, 32)])
def test_pipeline_loads_exactly_equal_to_diffusers(pipeline_folder, height, width):
    model = DiTForObjectDetection.from_diffusers(pipeline_folder, id2label=ID2LABEL, out_indices=(1, 2, 3),
                                                 feature_timestep=150, **HEAD).eval()
    transformer = DiTTransformer2DModel.from_pretrained(pipeline_folder, subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(pipeline_folder, subfolder="vae").eval()
    scheduler = DDPMScheduler.from_pretrained(pipeline_folder, subfolder="scheduler")
    config = model.config.backbone_config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 2, 3)
    assert config.backbone_stride == 4 and config.image_size == [16, 16] and config.base_grid_size == 4
    assert model.config.id2label == ID2LABEL

    pixels = torch.rand(2, 3, height, width) * 2 - 1
    with torch.no_grad():
        latents = model.model.backbone.vae(pixels)
        reference_latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        torch.testing.assert_close(latents, reference_latents, atol=1e-5, rtol=1e-5)

        # Our fixed noise at feature_timestep is exactly DDPM's forward process with that noise.
        noise = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(config.noise_seed))
        expected_noisy = scheduler.add_noise(latents, noise.expand_as(latents), torch.tensor([150]))
        noisy = model.model.backbone.diffusion_input(pixels)
        torch.testing.assert_close(noisy, expected_noisy, atol=1e-5, rtol=1e-5)

        ours = model(pixels, output_hidden_states=True).hidden_states[1:]
    theirs = block_outputs_of_diffusers(transformer, noisy, timestep=150)
    assert len(ours) == len(theirs) == 3
    for block, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"block {block}")
    if height != width:  # diffusers' own forward cannot return a non-square output ...
        with pytest.raises(RuntimeError):
            transformer(noisy, timestep=torch.tensor([150, 150]), class_labels=torch.tensor([NUM_CLASSES] * 2))
        assert model(pixels).pred_boxes.shape == (2, model.config.num_queries, 4)  # ... ours detects on it


def test_folded_conditioning_gives_identical_outputs(pipeline_folder):
    unfolded = DiTForObjectDetection.from_diffusers(pipeline_folder, id2label=ID2LABEL, out_indices=(2, 3), **HEAD).eval()
    folded = DiTForObjectDetection.from_diffusers(pipeline_folder, id2label=ID2LABEL, out_indices=(2, 3), **HEAD).eval()
    folded.load_state_dict(unfolded.state_dict())
    folded.fold_conditioning()
    assert folded.config.backbone_config.fold_conditioning
    assert not hasattr(folded.model.backbone, "timestep_embedder")
    assert folded.num_parameters() < unfolded.num_parameters()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected, actual = unfolded(pixels, output_hidden_states=True), folded(pixels, output_hidden_states=True)
    for a, b in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, atol=1e-6, rtol=1e-6)


def test_folded_model_saves_and_reloads(pipeline_folder, tmp_path):
    model = DiTForObjectDetection.from_diffusers(pipeline_folder, id2label=ID2LABEL, fold_conditioning=True, **HEAD).eval()
    model.save_pretrained(tmp_path)
    reloaded = DiTForObjectDetection.from_pretrained(tmp_path)
    assert reloaded.config.backbone_config.fold_conditioning
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_lone_transformer_folder_with_a_separate_vae(tmp_path):
    transformer, vae = tiny_diffusers_dit(), tiny_diffusers_vae()
    transformer.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="latent DiT .* no VAE was found"):
        DiTDetectionModel.from_diffusers(tmp_path / "transformer")
    model = DiTDetectionModel.from_diffusers(tmp_path / "transformer", vae=vae, out_indices=(3,), **HEAD)
    assert type(model) is DiTDetectionModel and model.config.backbone_config.num_hidden_layers == 3
    torch.testing.assert_close(model.backbone.layers[2].mlp.fc2.weight,
                               transformer.transformer_blocks[2].ff.net[2].weight)


def test_pixel_space_transformer_loads_without_a_vae(tmp_path):
    tiny_diffusers_dit(in_channels=3, sample_size=16).save_pretrained(tmp_path)
    model = DiTForObjectDetection.from_diffusers(tmp_path, id2label=ID2LABEL, out_indices=(1, 2), **HEAD)
    assert model.model.backbone.vae is None and model.config.backbone_stride == 2
    assert model.config.backbone_config.num_hidden_layers == 2
    assert model(torch.zeros(1, 3, 16, 16)).logits.shape == (1, model.config.num_queries, 3)


def test_pixel_space_pipeline_without_a_vae_loads(tmp_path):
    """A DiTPipeline saved with vae=None (pretrain_dit.py's pixel-space output): model_index.json says "vae": [null,
    null], which is no VAE, not a VAE to load."""
    transformer = tiny_diffusers_dit(in_channels=3, sample_size=16)
    DiTPipeline(transformer=transformer, vae=None, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    assert checkpoint_kind(tmp_path) == "diffusers"
    model = DiTForObjectDetection.from_diffusers(tmp_path, id2label=ID2LABEL, out_indices=(1, 2), **HEAD)
    assert model.model.backbone.vae is None and model.config.image_size == [16, 16]
    torch.testing.assert_close(model.model.backbone.layers[1].mlp.fc2.weight,
                               transformer.transformer_blocks[1].ff.net[2].weight)


def test_blocks_after_the_deepest_tap_are_dropped(pipeline_folder):
    model = DiTDetectionModel.from_diffusers(pipeline_folder, out_indices=(1,), **HEAD)
    assert len(model.backbone.layers) == 1


def test_geometry_overrides_that_disagree_are_rejected(pipeline_folder):
    with pytest.raises(ValueError, match=r"hidden_size=64 \(checkpoint: 32\)"):
        DiTForObjectDetection.from_diffusers(pipeline_folder, hidden_size=64)
    with pytest.raises(ValueError, match="exceeds the checkpoint's 3 blocks"):
        DiTForObjectDetection.from_diffusers(pipeline_folder, num_hidden_layers=5, out_indices=(5,))


def test_a_unet_pipeline_is_not_a_dit(tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"DDPMPipeline pipeline with components \['scheduler', 'unet'\].*not a DiT"):
        DiTForObjectDetection.from_diffusers(tmp_path)


def test_per_block_embedders_that_differ_are_rejected(tmp_path):
    transformer = tiny_diffusers_dit()
    torch.nn.init.normal_(transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight)
    transformer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.class_embedder.* differs from block 0"):
        DiTForObjectDetection.from_diffusers(tmp_path, vae=tiny_diffusers_vae())


def test_checkpoint_kind_is_read_from_the_files(pipeline_folder, tmp_path):
    assert checkpoint_kind(pipeline_folder) == "diffusers"
    assert checkpoint_kind(pipeline_folder / "transformer") == "diffusers"
    DiTForObjectDetection.from_diffusers(pipeline_folder, id2label=ID2LABEL, **HEAD).save_pretrained(tmp_path / "detector")
    assert checkpoint_kind(tmp_path / "detector") == "dit_detection"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither a diffusers DiT nor a saved DiT detector"):
        checkpoint_kind(tmp_path / "other")


def test_xl2_preset_maps_one_to_one_onto_diffusers_dit_xl2():
    """facebook/DiT-XL-2-256's transformer and VAE, instantiated from their configs on the meta device."""
    with torch.device("meta"):
        transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                            out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                            num_embeds_ada_norm=1000)
        vae = AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items()})
        config = DiTDetectionConfig.from_preset("DiT-XL/2", out_indices=(14, 18, 28))
        ours = DiTDetectionModel(config)
    dit = config.backbone_config
    assert config.image_size == [256, 256] and dit.base_grid_size == 16 and config.backbone_stride == 16

    converted = backbone_state_dict_from_diffusers(transformer.state_dict(), dit.num_hidden_layers)
    expected = {k: v for k, v in ours.backbone.state_dict().items() if not k.startswith("vae.")}
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    vae_weights = vae_encoder_state_dict_from_diffusers(vae.state_dict())
    assert vae_weights.keys() == ours.backbone.vae.state_dict().keys()
    assert all(vae_weights[k].shape == v.shape for k, v in ours.backbone.vae.state_dict().items())

    # Folding the fixed conditioning removes each block's adaLN MLP and the two embedders: about a third.
    backbone_params = sum(v.numel() for v in expected.values())
    folded_away = sum(v.numel() for k, v in expected.items() if "adaln_modulation" in k or "embedder" in k)
    folded_added = 28 * 6 * 1152
    final_layer = sum(v.numel() for k, v in transformer.state_dict().items() if k.startswith("proj_out"))
    fixed_positions = 256 * 1152  # a frozen parameter in the original code, computed on the fly here
    assert backbone_params + final_layer + fixed_positions == 675_129_632  # DiT-XL/2 as counted by its authors
    assert 0.32 < (folded_away - folded_added) / backbone_params < 0.34


def test_default_taps_lie_between_half_and_three_quarters_of_the_depth():
    assert default_out_indices(28) == [14, 18, 21]  # stages: the outputs of blocks 13, 17, 20 (0-based)
    assert default_out_indices(12) == [6, 8, 9]
