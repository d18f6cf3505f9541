"""Two-stage training pieces: what trains in each stage, and the layer-wise decayed optimiser groups."""

import pytest
from helpers import tiny_config
from transformers import TrainingArguments

from modeling_dit_detection import DiTForObjectDetection
from modeling_dit_detection.training.stages import set_trainable
from modeling_dit_detection.training.trainer import DetectionTrainer, parameter_groups


@pytest.fixture
def model():
    return DiTForObjectDetection(tiny_config("tiny-latent"))  # 4 blocks, with a VAE encoder


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_set_trainable_stages(model):
    names = {name for name, _ in model.named_parameters()}
    set_trainable(model, train_backbone=False)
    assert _trainable(model) == {n for n in names if not n.startswith(("model.backbone.", "model.backbone.vae."))}
    set_trainable(model, train_backbone=True)
    assert _trainable(model) == {n for n in names if not n.startswith("model.backbone.vae.")}
    set_trainable(model, train_backbone=True, unfreeze_last_blocks=1)
    backbone = {n for n in _trainable(model) if n.startswith("model.backbone.")}
    assert backbone and all(n.startswith("model.backbone.layers.3.") for n in backbone)


def test_parameter_groups_decay_the_backbone_rate_layer_by_layer(model):
    set_trainable(model, train_backbone=True)
    decayed = {name for name, _ in model.named_parameters() if name.endswith("weight")}
    groups = parameter_groups(model, learning_rate=1e-3, backbone_learning_rate=1e-4, layer_decay=0.5,
                              weight_decay=0.05, decay_parameter_names=decayed)
    rate = {id(p): (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(_trainable(model))  # every trainable parameter once, no frozen VAE ones
    for name in _trainable(model):
        lr, decay = rate[id(named[name])]
        if name.startswith("model.backbone.layers."):
            depth = 3 - int(name.split(".")[3])  # blocks between it and the last block
            assert lr == pytest.approx(1e-4 * 0.5**depth), name
        elif name.startswith("model.backbone."):
            assert lr == pytest.approx(1e-4 * 0.5**4), name  # patch and conditioning embedders: below block 0
        else:
            assert lr == 1e-3, name
        assert decay == (0.05 if name in decayed else 0.0), name
    assert groups[0]["lr"] == 1e-3  # the Trainer logs the first group's rate: the head's


def test_trainer_builds_the_groups_and_schedules_them_together(model, tmp_path):
    set_trainable(model, train_backbone=True)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, report_to="none",
                             lr_scheduler_type="linear", warmup_steps=0)
    trainer = DetectionTrainer(model=model, args=args, backbone_learning_rate=2e-4, layer_decay=0.5)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups}, reverse=True)
    assert rates == pytest.approx([1e-3, 2e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5])
    for _ in range(5):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert sorted({group["lr"] for group in trainer.optimizer.param_groups}, reverse=True) == pytest.approx(
        [r / 2 for r in rates])
