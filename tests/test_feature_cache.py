"""Frozen-stage feature caching (`--cache_frozen_features`, training/feature_cache.py): served features are the
backbone's, keys are exact, a trainable backbone is refused, the model's keys and weights are untouched, and a
stage-one run with the cache trains as the flip-only run without it."""

import pytest
import torch
from helpers import SMALL_JOB, load_run_detection, tiny_config
from safetensors.torch import load_file
from torchvision.transforms import v2
from transformers import AutoModelForObjectDetection, TrainerCallback

from modeling_dit_detection import DiTBackbone, DiTDetectionConfig, DiTDetectionImageProcessor, DiTForObjectDetection
from modeling_dit_detection.training.data import (
    AlternatingHorizontalFlip,
    DetectionTransform,
    make_train_augmentation,
    processor_size,
)
from modeling_dit_detection.training.feature_cache import (
    FrozenFeatureCache,
    input_keys,
    install_feature_cache,
    remove_feature_cache,
)
from modeling_dit_detection.training.stages import set_trainable
from modeling_dit_detection.training.trainer import parameter_groups

run_detection = load_run_detection()


def _frozen_model(preset: str = "tiny") -> DiTForObjectDetection:
    torch.manual_seed(0)
    model = DiTForObjectDetection(tiny_config(preset))
    set_trainable(model, train_backbone=False)
    return model


def _pixels(model, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *model.config.image_size, generator=generator) * 2 - 1


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("preset", ["tiny", "tiny-latent"])
def test_served_features_equal_the_backbones_bit_for_bit(preset):
    model = _frozen_model(preset)
    backbone = model.model.backbone
    pixels = _pixels(model, 4)
    expected = backbone(pixels).feature_maps
    cache = install_feature_cache(model)
    assert model.model.backbone is cache
    first = cache(pixels).feature_maps  # all misses: the backbone runs on the batch
    again = cache(pixels.clone()).feature_maps  # all hits: served from the cache
    assert _equal(first, expected) and _equal(again, expected)
    assert all(tap.dtype == backbone.dtype and not tap.requires_grad for tap in again)
    assert cache.counts["train"] == [4, 4]

    new = _pixels(model, 2, seed=1)
    mixed = cache(torch.cat([pixels[2:], new])).feature_maps  # two hits, two misses run as a batch of 2
    for tap, seen, fresh in zip(mixed, expected, backbone(new).feature_maps):
        assert torch.equal(tap[:2], seen[2:]) and torch.equal(tap[2:], fresh)
    assert cache.counts["train"] == [6, 6] and len(cache.store) == 6

    model.eval()  # evaluation is counted apart; the whole detector's outputs are unchanged by the cache
    with torch.no_grad():
        cached = model(pixels)
        remove_feature_cache(model)
        assert model.model.backbone is backbone
        plain = model(pixels)
    assert cache.counts["eval"] == [4, 0]
    assert torch.equal(cached.logits, plain.logits) and torch.equal(cached.pred_boxes, plain.pred_boxes)


def test_a_flipped_image_is_another_key():
    model = _frozen_model()
    pixels = _pixels(model, 2)
    flipped = pixels.flip(-1)
    keys = input_keys(pixels)
    assert keys == input_keys(pixels.clone()) and keys[0] != keys[1]
    assert set(keys).isdisjoint(input_keys(flipped))
    assert set(keys).isdisjoint(input_keys(pixels.double()))  # same values, another dtype: another input
    assert input_keys(pixels[:1])[0] != input_keys(pixels[:1, :, :, :32])[0]  # another shape

    cache = install_feature_cache(model)
    cache(pixels)
    served = cache(flipped).feature_maps
    assert cache.counts["train"] == [0, 4]  # the flipped images missed
    assert _equal(served, cache.backbone(flipped).feature_maps)
    assert not _equal(served, cache.backbone(pixels).feature_maps)


def test_a_trainable_backbone_is_refused():
    model = DiTForObjectDetection(tiny_config())  # everything trains
    with pytest.raises(RuntimeError, match="only serves a frozen backbone"):
        install_feature_cache(model)
    set_trainable(model, train_backbone=False)
    cache = install_feature_cache(model)
    pixels = _pixels(model, 2)
    cache(pixels)
    cache.backbone.layers[-1].requires_grad_(True)  # e.g. stage two unfreezing it with the cache still in place
    with pytest.raises(RuntimeError, match="backbone parameters require grad"):
        cache(pixels)
    with pytest.raises(RuntimeError, match="only serves a frozen backbone"):
        model(pixels)  # served nothing stale: the whole forward fails


def test_hidden_states_are_passed_through_uncached():
    model = _frozen_model()
    cache = install_feature_cache(model)
    pixels = _pixels(model, 2)
    outputs = cache(pixels, output_hidden_states=True)
    assert len(outputs.hidden_states) == model.config.backbone_config.num_hidden_layers + 1
    assert _equal(outputs.feature_maps, cache.backbone(pixels).feature_maps)
    assert cache.counts["train"] == [0, 0] and len(cache.store) == 0


def test_the_model_keeps_its_keys_and_weights_while_the_cache_is_in_place(tmp_path):
    model = _frozen_model("tiny-latent")
    backbone = model.model.backbone
    state = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    cache = install_feature_cache(model)
    assert isinstance(cache, FrozenFeatureCache) and not isinstance(model.model.backbone, DiTBackbone)
    cached_state = model.state_dict()
    assert list(cached_state) == list(state)
    assert all(cached_state[key].data_ptr() == state[key].data_ptr() for key in state)  # the very same tensors
    assert [name for name, _ in model.named_parameters()] == names
    # The optimiser's grouping still finds the backbone's blocks (none of them trains in stage one).
    groups = parameter_groups(model, 1e-3, 1e-4, 0.9, 0.0, set())
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())

    model.save_pretrained(tmp_path / "saved")  # what a stage-one checkpoint does
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(state)
    assert all(torch.equal(saved[key], state[key]) for key in saved)
    reloaded = DiTForObjectDetection.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.model.backbone, DiTBackbone) and list(reloaded.state_dict()) == list(state)
    model.load_state_dict(reloaded.state_dict())  # a resume loads a checkpoint into the model with the cache

    assert remove_feature_cache(model) is backbone and model.model.backbone is backbone
    assert list(model.state_dict()) == list(state)


def test_a_feature_folder_is_reused_for_the_same_backbone_only(tmp_path):
    model = _frozen_model()
    pixels = _pixels(model, 3)
    first = install_feature_cache(model, cache_dir=tmp_path)
    expected = first(pixels).feature_maps
    assert first.counts["train"] == [0, 3] and len(list(tmp_path.glob("*/*.safetensors"))) == 3
    remove_feature_cache(model)

    second = install_feature_cache(model, cache_dir=tmp_path)  # a later run, the same backbone
    assert _equal(second(pixels).feature_maps, expected) and second.counts["train"] == [3, 0]
    assert second.size_mib > 0 and len(second.store) == 3
    remove_feature_cache(model)

    with torch.no_grad():
        model.model.backbone.patch_embed.bias.add_(0.1)  # another backbone: its own folder
    third = install_feature_cache(model, cache_dir=tmp_path)
    served = third(pixels).feature_maps
    assert third.counts["train"] == [0, 3] and len(list(tmp_path.iterdir())) == 2
    assert _equal(served, third.backbone(pixels).feature_maps) and not _equal(served, expected)


# ------------------------------------------------------------------------------------------------------------------
# run_detection.py with --cache_frozen_features
# ------------------------------------------------------------------------------------------------------------------

class CacheProbe(TrainerCallback):
    """Per stage: what stands in for the backbone, the training augmentation, and the cache's running training and
    evaluation counts at the end of each epoch and of each evaluation."""

    def __init__(self):
        self.stages = []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        transform = train_dataloader.dataset.format["format_kwargs"]["transform"]
        self.stages.append({"backbone": model.model.backbone, "augmentation": transform.augmentation,
                            "epochs": [], "evaluations": []})

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        backbone = model.model.backbone
        if isinstance(backbone, FrozenFeatureCache):
            self.stages[-1]["epochs"].append(list(backbone.totals["train"]))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        backbone = model.model.backbone
        if isinstance(backbone, FrozenFeatureCache):
            self.stages[-1]["evaluations"].append(list(backbone.totals["eval"]))


def _transforms(augmentation) -> set[type]:
    return {type(t) for t in augmentation.transforms} | {
        type(inner) for t in augmentation.transforms if isinstance(t, v2.RandomApply) for inner in t.transforms}


def test_stage_one_misses_then_hits_and_stage_two_runs_without_the_cache(tmp_path):
    output_dir = tmp_path / "out"
    probe = CacheProbe()
    metrics = run_detection.run(*run_detection.parse_arguments(
        [*SMALL_JOB, "--output_dir", str(output_dir), "--cache_frozen_features", "true", "--num_train_epochs", "4",
         "--freeze_backbone_epochs", "3", "--report_to", "none", "--preview_images", "0"]), callbacks=[probe])
    stage1, stage2 = probe.stages
    # Stage one: the cache stands in for the backbone, the augmentation is flip only (built-in job: "light").
    assert isinstance(stage1["backbone"], FrozenFeatureCache)
    assert AlternatingHorizontalFlip in _transforms(stage1["augmentation"])
    assert v2.ColorJitter not in _transforms(stage1["augmentation"])
    # Stage two: the real backbone (it trains) and the run's full augmentation again.
    assert isinstance(stage2["backbone"], DiTBackbone) and stage2["epochs"] == []
    assert v2.ColorJitter in _transforms(stage2["augmentation"])

    # The flips alternate: epoch 1 misses every image, epoch 2 sees each image the other way round (misses again),
    # epoch 3 hits every image.
    processor = DiTDetectionImageProcessor.from_pretrained(output_dir)
    _, data_args, _, training_args = run_detection.parse_arguments([*SMALL_JOB, "--output_dir", str(tmp_path / "x")])
    train = run_detection.prepare_data(data_args, training_args).splits["train"]
    transform = DetectionTransform(processor, make_train_augmentation(processor_size(processor), "flip"),
                                   seed=training_args.seed)
    inputs = []
    for epoch in (0, 1, 2):
        transform.epoch = epoch
        inputs.append(transform(train[:])["pixel_values"])
    assert not any(torch.equal(a, b) for a, b in zip(inputs[0], inputs[1]))
    assert all(torch.equal(a, b) for a, b in zip(inputs[0], inputs[2]))
    assert stage1["epochs"] == [[0, 24], [0, 48], [24, 48]]  # running totals [hits, misses]
    assert stage1["evaluations"] == [[0, 6], [6, 6], [12, 6]]  # the validation images: missed once, then served
    assert (metrics["stage1_feature_cache_hits"], metrics["stage1_feature_cache_misses"]) == (24, 48)
    assert metrics["stage1_feature_cache_entries"] == 48 + 6 and metrics["stage1_feature_cache_mib"] > 0

    # Checkpoints of stage one (saved with the cache in place) and the run's model: the same keys, the real backbone
    # weights (unchanged in stage one); the saved model loads.
    final = load_file(str(output_dir / "model.safetensors"))
    expected_keys = set(DiTForObjectDetection(DiTDetectionConfig.from_pretrained(output_dir)).state_dict())
    kept = sorted((output_dir / "stage1").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    first, last = (load_file(str(checkpoint / "model.safetensors")) for checkpoint in (kept[0], kept[-1]))
    assert kept[-1].name == "checkpoint-9" and len(kept) == 2
    assert set(final) == set(first) == set(last) == expected_keys
    backbone_keys = [key for key in first if key.startswith("model.backbone.")]
    assert backbone_keys and all(torch.equal(first[key], last[key]) for key in backbone_keys)
    assert AutoModelForObjectDetection.from_pretrained(output_dir).config.num_labels == 5
    card = (output_dir / "README.md").read_text()
    assert "Cached frozen features" in card and "horizontal flip only" in card


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_stage_one_with_the_cache_trains_as_flip_only_augmentation_without_it(tmp_path):
    """Same seed, stage one only, 3 epochs of 3 steps: the loss of every step with the cache equals the run without
    the cache whose augmentation is flip only. Epoch 1 misses every image, so the backbone runs on the very same
    batches: equal to the bit. Later epochs serve features computed in other batches; the backbone gives every
    image the same bits in any batch on the CPUs this was measured on (bit-identical there), and within float
    noise wherever kernels depend on the batch size."""
    argv = [*SMALL_JOB, "--num_train_epochs", "3", "--freeze_backbone_epochs", "3", "--logging_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--synthetic_eval_size", "2", "--report_to", "none",
            "--preview_images", "0"]
    curves = []
    for name, extra in (("plain", ["--augmentation", "flip"]), ("cached", ["--cache_frozen_features", "true"])):
        losses = Losses()
        run_detection.run(*run_detection.parse_arguments([*argv, "--output_dir", str(tmp_path / name), *extra]),
                          callbacks=[losses])
        curves.append(losses.losses)
    plain, cached = curves
    assert len(plain) == len(cached) == 9
    assert cached[:3] == plain[:3]
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)


@pytest.mark.slow  # about 15-20 s (two processes start); CI runs the slow tests after the default suite
def test_two_process_ddp_stage_one_with_the_cache(tmp_path):
    """torchrun, 2 CPU processes (gloo), gradient checkpointing (the combination DDP trips on most easily): stage one
    with the cache in place trains and each process serves its own cache; stage two trains the backbone without it."""
    import json
    import subprocess
    import sys

    from helpers import ROOT, worker_env
    from test_run_detection import _free_port

    output_dir = tmp_path / "ddp"
    # 5 eval images in batches of 2: every process evaluates two batches (a process with a single eval batch trips a
    # transformers gather of the losses, with or without the cache).
    argv = [*SMALL_JOB, "--num_train_epochs", "4", "--freeze_backbone_epochs", "3", "--eval_strategy", "no",
            "--save_strategy", "no", "--synthetic_eval_size", "5", "--per_device_eval_batch_size", "2",
            "--report_to", "none", "--preview_images", "0",
            "--cache_frozen_features", "true", "--ddp_backend", "gloo", "--use_cpu", "true",
            "--gradient_checkpointing", "true", "--output_dir", str(output_dir)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), str(ROOT / "run_detection.py"), *argv],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600, env=worker_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Feature cache (process 1), stage one epoch 2, training" in result.stdout
    metrics = json.loads((output_dir / "all_results.json").read_text())
    # Summed over both processes: 3 epochs x 2 processes x 16 images (12 each, padded to 2 batches of 8). Epoch 2
    # shows every image mirrored the other way (all misses); epoch 3 hits the images a process saw in epoch 1.
    assert metrics["stage1_feature_cache_hits"] + metrics["stage1_feature_cache_misses"] == 96
    assert metrics["stage1_feature_cache_hits"] > 0 and "stage2_train_loss" in metrics
