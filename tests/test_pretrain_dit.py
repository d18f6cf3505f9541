"""pretrain_dit.py: diffusion pretraining end to end, its pipeline folder in from_diffusers (exact against diffusers)
and in run_detection.py, resuming, EMA, the loss, bad arguments."""

import json
import subprocess
import sys

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from helpers import ROOT, StageRecorder, load_pretrain_dit, load_run_detection, worker_env

from modeling_dit_detection import DiTForObjectDetection
from modeling_dit_detection.training.diffusion import DiffusionLoss, noise_scheduler, tie_conditioning_embedders

pretrain_dit = load_pretrain_dit()

# A run of a few seconds: the "tiny" preset (hidden 32, depth 4, patch 4, pixel space) on 32 x 32 images, 16 built-in
# training images in batches of 8, no samples unless asked for.
TINY_MODEL = ["--model_preset", "tiny", "--image_size", "32", "--train_batch_size", "8", "--learning_rate", "1e-3",
              "--lr_warmup_steps", "0", "--logging_steps", "5", "--num_samples", "0"]
TINY = [*TINY_MODEL, "--synthetic_train_size", "16"]  # on the built-in shapes


def pretrain(*argv):
    return pretrain_dit.run(*pretrain_dit.parse_arguments([str(a) for a in argv]))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(output folder, results) of a 12-step run with samples, shared by the tests that read it."""
    output_dir = tmp_path_factory.mktemp("pretrain") / "dit"
    results = pretrain(*TINY, "--max_train_steps", 12, "--checkpointing_steps", 8, "--num_samples", 4,
                       "--sample_inference_steps", 4, "--output_dir", output_dir)
    return output_dir, results


def diffusers_block_outputs(transformer, latents, timestep):
    """diffusers' hidden states after every block (forward hooks), at `timestep` and the null class."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
             for block in transformer.transformer_blocks]
    batch = latents.shape[0]
    try:
        with torch.no_grad():
            transformer(latents, timestep=torch.full((batch,), timestep),
                        class_labels=torch.full((batch,), transformer.config.num_embeds_ada_norm))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def assert_backbone_equals_diffusers(folder, image_size):
    """The detector from_diffusers builds from `folder`: its blocks' outputs equal the diffusers transformer's."""
    model = DiTForObjectDetection.from_diffusers(folder, id2label={0: "a", 1: "b"}, num_hidden_layers=4,
                                                 out_indices=(2, 4), feature_timestep=150).eval()
    transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    assert model.config.image_size == [image_size, image_size]
    pixels = torch.rand(2, 3, image_size, image_size) * 2 - 1
    with torch.no_grad():
        noisy = model.model.backbone.diffusion_input(pixels)
        ours = model(pixels, output_hidden_states=True).hidden_states
    theirs = diffusers_block_outputs(transformer, noisy, timestep=150)
    assert len(ours) - 1 == len(theirs) == 4
    for block, (a, b) in enumerate(zip(ours[1:], theirs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"block {block}")
    # The blocks were trained: they are not the identity they start as (adaLN-Zero).
    assert (ours[-1] - ours[0]).abs().max() > 1e-3
    return model


def test_pixel_space_run_writes_a_pipeline_that_loads_exactly_in_from_diffusers(pretrained):
    output_dir, results = pretrained
    for name in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "loss_curve.png", "samples.png", "pretrain_results.json"):
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "vae").exists()
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["vae"] == [None, None]
    config = json.loads((output_dir / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"], config["patch_size"]) == (3, 6, 32, 4)
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"],
            scheduler["num_train_timesteps"], scheduler["prediction_type"], scheduler["variance_type"]) == (
        "DDPMScheduler", "linear", 1e-4, 0.02, 1000, "epsilon", "fixed_small")

    written = json.loads((output_dir / "pretrain_results.json").read_text())
    assert written["steps"] == results["steps"] == 12 and len(written["losses"]) == 12
    assert PIL.Image.open(output_dir / "samples.png").size == (2 * 130 + 2, 2 * 130 + 2)  # 2 x 2 tiles of 128 px
    assert PIL.Image.open(output_dir / "loss_curve.png").size == (800, 480)

    model = assert_backbone_equals_diffusers(output_dir, image_size=32)
    assert model.model.backbone.vae is None and model.config.backbone_stride == 4
    # diffusers' own pipeline loads it too (pixel space: no VAE).
    assert DiTPipeline.from_pretrained(output_dir, vae=None).transformer.config.num_layers == 4


def test_the_pipeline_holds_the_ema_weights_and_the_last_checkpoint_the_raw_ones(pretrained):
    output_dir, _ = pretrained
    checkpoint = output_dir / "checkpoints" / "checkpoint-12"
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-8"]
    saved = DiTTransformer2DModel.from_pretrained(output_dir, subfolder="transformer")
    tie_conditioning_embedders(saved)  # the parameter order the EMA tracks: the shared embedder once
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema["optimization_step"] == 12
    parameters = list(saved.parameters())
    assert len(parameters) == len(ema["shadow_params"])
    for parameter, shadow in zip(parameters, ema["shadow_params"]):
        torch.testing.assert_close(parameter, shadow, rtol=0, atol=0)

    raw = DiTTransformer2DModel.from_config(saved.config)
    tie_conditioning_embedders(raw, check_equal=False)
    raw.load_state_dict(torch.load(checkpoint / "pytorch_model.bin", weights_only=True))
    differing = [name for (name, a), b in zip(raw.named_parameters(), parameters) if not torch.equal(a, b)]
    assert len(differing) > len(parameters) // 2  # the EMA lags the raw weights everywhere training moved them


def test_the_output_folder_fine_tunes_in_run_detection_with_the_two_stage_recipe(pretrained, tmp_path):
    output_dir, _ = pretrained
    run_detection = load_run_detection()
    recorder = StageRecorder()
    argv = ["--model_name_or_path", str(output_dir), "--output_dir", str(tmp_path / "detector"),
            "--synthetic_train_size", "16", "--synthetic_eval_size", "4", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--max_steps", "2", "--warmup_steps", "0", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--preview_images", "0", "--config_overrides",
            json.dumps({"num_queries": 10, "num_query_groups": 2, "d_model": 32, "decoder_layers": 2,
                        "decoder_attention_heads": 2, "decoder_ffn_dim": 64})]
    metrics = run_detection.run(*run_detection.parse_arguments(argv), callbacks=[recorder])
    # A pretrained backbone: two stages, the first on a frozen DiT; the input size is the pretraining size.
    assert [run["stage"] for run in recorder.runs] == ["stage1", "stage2"]
    assert not any(recorder.runs[0]["backbone_changed"].values())
    assert any(recorder.runs[1]["backbone_changed"].values())
    assert "backbone" not in recorder.runs[0]["trainable"] and "backbone" in recorder.runs[1]["trainable"]
    saved = json.loads((tmp_path / "detector" / "config.json").read_text())
    assert saved["backbone_config"]["image_size"] == [32, 32] and saved["backbone_config"]["vae_config"] is None
    assert 0 <= metrics["test_map"] <= 1


def test_latent_dit_with_a_frozen_vae(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=32).save_pretrained(tmp_path / "vae")
    before = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    output_dir = tmp_path / "latent"
    pretrain(*TINY, "--model_preset", "tiny-latent", "--vae_name_or_path", tmp_path / "vae", "--max_train_steps", 6,
             "--num_samples", 2, "--sample_inference_steps", 2, "--output_dir", output_dir)
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    after = AutoencoderKL.from_pretrained(output_dir, subfolder="vae").state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # frozen
    config = json.loads((output_dir / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["sample_size"], config["patch_size"]) == (4, 16, 2)  # 32 px / VAE x2
    model = assert_backbone_equals_diffusers(output_dir, image_size=32)
    assert model.model.backbone.vae is not None and model.config.backbone_stride == 4
    assert (output_dir / "samples.png").is_file()


def test_a_resumed_run_continues_the_step_count_and_ends_where_the_uninterrupted_run_ends(tmp_path):
    common = [*TINY, "--checkpointing_steps", 2, "--synthetic_train_size", 12]  # 2 batches an epoch: epochs cross
    whole = pretrain(*common, "--max_train_steps", 7, "--output_dir", tmp_path / "whole")
    pretrain(*common, "--max_train_steps", 3, "--output_dir", tmp_path / "part")
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    resumed = pretrain(*common, "--max_train_steps", 7, "--output_dir", tmp_path / "part",
                       "--resume_from_checkpoint", "latest")
    assert resumed["steps"] == whole["steps"] == 7
    losses = [json.loads((tmp_path / name / "pretrain_results.json").read_text())["losses"] for name in ("whole", "part")]
    assert losses[0] == losses[1] and len(losses[1]) == 7
    state = json.loads((tmp_path / "part" / "checkpoints" / "checkpoint-7" / "pretrain_state.json").read_text())
    assert state["step"] == 7 and state["epoch"] == 3
    for name in ("whole", "part"):
        assert not (tmp_path / name / "checkpoints" / "checkpoint-2").exists()  # only the newest two are kept
    weights = [DiTTransformer2DModel.from_pretrained(tmp_path / name, subfolder="transformer").state_dict()
               for name in ("whole", "part")]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)


def test_the_loss_goes_down_on_a_fixed_batch(tmp_path):
    """8 images, one batch of 8 every step (no flips); only the noise and the timesteps are drawn anew."""
    results = pretrain(*TINY, "--synthetic_train_size", 8, "--random_flip", "false", "--max_train_steps", 40,
                       "--learning_rate", 3e-3, "--checkpointing_steps", 100, "--output_dir", tmp_path / "overfit")
    losses = json.loads((tmp_path / "overfit" / "pretrain_results.json").read_text())["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.9  # adaLN-Zero: the model starts by predicting no noise at all (MSE about 1)
    assert last < 0.7 * first, losses  # measured: 0.98 -> about 0.5
    assert results["final_loss"] < results["first_loss"]


def test_a_non_finite_loss_stops_the_run_before_its_optimiser_step(tmp_path, monkeypatch):
    calls = []
    real_loss = pretrain_dit.training_loss

    def loss_that_breaks_at_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pretrain_dit, "training_loss", loss_that_breaks_at_step_3)
    with pytest.raises(RuntimeError, match="The loss is nan at step 3: stopping before the optimiser step"):
        pretrain(*TINY, "--max_train_steps", 5, "--output_dir", tmp_path / "nan")


def test_continuing_a_pretrained_dit(pretrained, tmp_path):
    output_dir, _ = pretrained
    results = pretrain("--model_name_or_path", output_dir, "--synthetic_train_size", 8, "--train_batch_size", 8,
                       "--max_train_steps", 2, "--num_samples", 0, "--output_dir", tmp_path / "continued")
    assert results["steps"] == 2 and f"DiT from {output_dir}" in results["model"]
    config = json.loads((tmp_path / "continued" / "transformer" / "config.json").read_text())
    assert config["sample_size"] == 32  # the checkpoint's size, not the preset's


def test_a_detection_dataset_gives_the_images_of_run_detections_train_split(tmp_path):
    """A save_to_disk detection dataset without a validation split: run_detection.py holds part of train out for
    validation; pretraining reads exactly the remaining train images, never the held-out ones."""
    from modeling_dit_detection.training.synthetic_data import make_synthetic_detection_dataset

    make_synthetic_detection_dataset(num_train=20, num_validation=1, num_test=1, seed=3)["train"].save_to_disk(
        tmp_path / "data")
    run_detection = load_run_detection()
    data_args = run_detection.parse_arguments(["--dataset_name", str(tmp_path / "data"), "--output_dir", "x"])[1]
    splits = run_detection.load_data(data_args, seed=42)[0]
    dataset, name = pretrain_dit.load_images(pretrain_dit.DataArguments(dataset_name=str(tmp_path / "data")), seed=42)
    assert name == str(tmp_path / "data") and len(dataset) == len(splits["train"]) == 17  # 15 % (3) held out
    assert dataset["image"][0].tobytes() == splits["train"][0]["image"].tobytes()
    results = pretrain(*TINY_MODEL, "--dataset_name", tmp_path / "data", "--max_train_steps", 2, "--output_dir",
                       tmp_path / "out")
    assert results["images"] == 17


def _make_folder(path, files=()):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files:
        (path / name).write_bytes(content)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--model_preset", "huge"], r"Unknown --model_preset 'huge'; choose one of \['DiT-S/2'"),
    (["--image_size", "30"], r"--image_size 30 is not a multiple of the DiT's stride 4 \(patch 4 x VAE downsampling 1\)"),
    (["--model_preset", "DiT-S/2"], "DiT-S/2 is a latent DiT: give a pretrained VAE with --vae_name_or_path"),
    (["--max_train_steps", "0"], "--max_train_steps must be a positive integer"),
    (["--ema_decay", "1.5"], r"--ema_decay must lie in \[0, 1\]"),
    (["--model_name_or_path", "x"], "not both"),
    (["--resume_from_checkpoint", "latest"], "no complete checkpoint .* nothing to resume"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0, got nan"),
    # options of data that is not given: the run would pretrain on the built-in shapes instead of the user's images
    (["--image_dir", "images"], "--image_dir would be ignored with the built-in synthetic data"),
    (["--image_folder", "photos", "--bbox_format", "yolo"],
     "--bbox_format, --synthetic_train_size would be ignored with --image_folder"),
    (["--dataset_name", "cppe-5", "--image_dir", "images"], "--image_dir, --synthetic_train_size would be ignored "
                                                           "with --dataset_name"),
])
def test_bad_arguments_are_refused_before_any_data_is_read(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(pretrain_dit, "load_images", lambda *a: pytest.fail("data loaded before the check"))
    argv = [*TINY, *extra, "--output_dir", tmp_path / "out"]
    with pytest.raises(ValueError, match=message):
        pretrain(*argv)
    assert not (tmp_path / "out").exists()


def test_report_to_none_means_no_tracker_as_in_run_detection(tmp_path):
    results = pretrain(*TINY, "--max_train_steps", 1, "--report_to", "none", "--output_dir", tmp_path / "out")
    assert results["steps"] == 1 and not (tmp_path / "out" / "logs").exists()


def test_a_non_empty_output_folder_is_refused_without_overwrite(tmp_path):
    output_dir = _make_folder(tmp_path / "out", [("notes.txt", b"keep me")])
    with pytest.raises(ValueError, match=r"exists and is not empty \(notes.txt\).*--overwrite_output_dir true"):
        pretrain(*TINY, "--max_train_steps", 1, "--output_dir", output_dir)
    pretrain(*TINY, "--max_train_steps", 1, "--output_dir", output_dir, "--overwrite_output_dir", "true")
    assert (output_dir / "model_index.json").is_file() and (output_dir / "notes.txt").read_bytes() == b"keep me"


def test_an_empty_or_undecodable_image_folder_is_an_error(tmp_path):
    empty = _make_folder(tmp_path / "empty", [("readme.txt", b"no images")])
    with pytest.raises(ValueError, match="holds no image files"):
        pretrain(*TINY_MODEL, "--image_folder", empty, "--output_dir", tmp_path / "a")
    broken = _make_folder(tmp_path / "broken", [("a.png", b"not a png"), ("b.jpg", b"\xff\xd8 truncated")])
    with pytest.raises(ValueError, match=r"train row 0 \(.*a.png\): cannot decode the image"):
        pretrain(*TINY_MODEL, "--image_folder", broken, "--output_dir", tmp_path / "b")
    with pytest.raises(ValueError, match=r"No images to pretrain on in .*broken \(every one was undecodable"):
        pretrain(*TINY_MODEL, "--image_folder", broken, "--skip_bad_images", "true", "--output_dir", tmp_path / "c")


def test_an_image_folder_of_any_sizes_trains(tmp_path):
    folder = _make_folder(tmp_path / "images" / "nested")
    for index, size in enumerate([(40, 30), (64, 64), (100, 20)]):
        PIL.Image.new("RGB" if index else "L", size, (index * 80,) * (3 if index else 1)).save(folder / f"{index}.png")
    (folder / "broken.jpg").write_bytes(b"nope")
    results = pretrain(*TINY_MODEL, "--image_folder", tmp_path / "images", "--skip_bad_images", "true",
                       "--max_train_steps", 2, "--output_dir", tmp_path / "out")
    assert results["images"] == 3 and results["steps"] == 2


def test_hybrid_loss_is_zero_for_the_true_noise_and_posterior_variance():
    scheduler = noise_scheduler(pixel_space=True)
    loss = DiffusionLoss(scheduler)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    timesteps = torch.tensor([1, 10, 500, 999])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    # v = -1 gives the posterior variance itself; with the true noise the model's posterior is the true one.
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    torch.testing.assert_close(loss(exact, x0, noisy, noise, timesteps), torch.zeros(4), atol=1e-4, rtol=0)
    # Any other variance costs a positive KL, and only the variance half gets its gradient.
    output = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    value = loss(output, x0, noisy, noise, timesteps)
    assert (value > 0).all()
    value.sum().backward()
    assert output.grad[:, :3].abs().max() == 0 and output.grad[:, 3:].abs().max() > 0
    # At t = 0 the term is the discretised likelihood of x0 (positive bits), and without a variance output the
    # loss is the plain epsilon MSE.
    zero = torch.zeros(4, dtype=torch.long)
    assert (loss(exact, x0, scheduler.add_noise(x0, noise, zero), noise, zero) > 0).all()
    predicted = noise + 0.1
    torch.testing.assert_close(loss(predicted, x0, noisy, noise, timesteps), torch.full((4,), 0.01))


def test_per_block_embedders_that_differ_cannot_be_tied():
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, num_layers=2,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=1)
    with pytest.raises(ValueError, match=r"transformer_blocks.1.norm1.emb.* differs from block 0"):
        tie_conditioning_embedders(transformer)


@pytest.mark.slow  # long: a subprocess or a whole run (the default suite stays short)
def test_the_script_runs_from_a_yaml_file(tmp_path):
    output_dir = tmp_path / "cli"
    job = tmp_path / "job.yaml"
    job.write_text("model_preset: tiny\nimage_size: 32\nsynthetic_train_size: 8\ntrain_batch_size: 8\n"
                   f"max_train_steps: 2\nnum_samples: 1\nsample_inference_steps: 2\noutput_dir: {output_dir}\n")
    completed = subprocess.run([sys.executable, str(ROOT / "pretrain_dit.py"), str(job)], capture_output=True,
                               text=True, env=worker_env(), timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "pretrained 2 steps in" in completed.stdout and str(output_dir) in completed.stdout
    assert (output_dir / "samples.png").is_file()


def test_built_in_job_defaults_apply_only_without_data_or_model():
    _, _, args = pretrain_dit.parse_arguments(["--output_dir", "x"])
    assert (args.max_train_steps, args.learning_rate, args.lr_warmup_steps) == (1000, 1e-3, 100)
    _, _, args = pretrain_dit.parse_arguments(["--output_dir", "x", "--image_folder", "images"])
    assert (args.max_train_steps, args.learning_rate, args.lr_warmup_steps) == (10000, 1e-4, 0)
    _, _, args = pretrain_dit.parse_arguments(["--output_dir", "x", "--learning_rate", "3e-4", "--model_preset", "tiny"])
    assert (args.max_train_steps, args.learning_rate) == (1000, 3e-4)
    _, _, args = pretrain_dit.parse_arguments(["--output_dir", "x", "--model_name_or_path", "some/dit"])
    assert (args.max_train_steps, args.learning_rate, args.lr_warmup_steps) == (10000, 1e-4, 0)
