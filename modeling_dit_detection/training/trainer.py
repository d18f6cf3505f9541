"""Two-stage fine-tuning with transformers' `Trainer`: what is trainable in each stage, and the optimiser groups.

Stage one trains the neck and head on a frozen DiT; stage two also trains the backbone (all of it, or its last
blocks) at a smaller, layer-wise decayed learning rate. Each stage is its own `Trainer`, so each is its own DDP
wrap: a parameter that starts requiring gradients after DDP wrapped the model would never be all-reduced.
The VAE encoder is always frozen.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ..modeling_dit_detection import DiTBackbone, DiTDetectionVAEEncoder
from .coco_metric import DetectionEvaluator

logger = logging.getLogger(__name__)
_BLOCK = re.compile(r"(?:^|\.)backbone\.layers\.(\d+)\.")


def _backbone(model: nn.Module) -> DiTBackbone:
    return next(module for module in model.modules() if isinstance(module, DiTBackbone))


def set_trainable(model: nn.Module, train_backbone: bool, unfreeze_last_blocks: int | None = None) -> None:
    """Freeze or unfreeze the backbone. With `unfreeze_last_blocks=K`, only its last K blocks train (the patch
    embedding, the conditioning and the earlier blocks stay frozen). Everything outside the backbone trains,
    except the VAE encoder, which never does."""
    backbone = _backbone(model)
    model.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, DiTDetectionVAEEncoder):
            module.requires_grad_(False)
    backbone.requires_grad_(False)
    if not train_backbone:
        return
    num_blocks = len(backbone.layers)
    first = 0 if unfreeze_last_blocks is None else max(0, num_blocks - unfreeze_last_blocks)
    if first == 0:
        backbone.requires_grad_(True)
    else:
        for block in backbone.layers[first:]:
            block.requires_grad_(True)


def count_trainable(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def backbone_lr_scale(name: str, num_blocks: int, layer_decay: float) -> float | None:
    """Learning-rate factor of a backbone parameter relative to the backbone learning rate: `layer_decay ** d`,
    d = blocks between it and the last block (embeddings count as one below block 0). None if not backbone."""
    if ".backbone." not in f".{name}":
        return None
    match = _BLOCK.search(name)
    depth = num_blocks - 1 - int(match.group(1)) if match else num_blocks
    return layer_decay**depth


def parameter_groups(model: nn.Module, learning_rate: float, backbone_learning_rate: float, layer_decay: float,
                     weight_decay: float, decay_parameter_names: set[str]) -> list[dict]:
    """Optimiser groups of the trainable parameters: the head at `learning_rate`, backbone parameters at
    `backbone_learning_rate * layer_decay ** depth`; weight decay only for `decay_parameter_names`."""
    num_blocks = len(_backbone(model).layers)
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = backbone_lr_scale(name, num_blocks, layer_decay)
        lr = learning_rate if scale is None else backbone_learning_rate * scale
        decay = weight_decay if name in decay_parameter_names else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    # Highest learning rate first: the Trainer logs the first group's rate, which should be the head's.
    ordered = sorted(groups.items(), key=lambda item: -item[0][0])
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in ordered]


class DetectionTrainer(Trainer):
    """`Trainer` whose optimiser gives the backbone its own, layer-wise decayed learning rate, whose every
    evaluation gathers per-image labels as objects, and whose `DetectionEvaluator` scores each evaluation against the
    ground truth of the split it evaluates (chosen by `metric_key_prefix`)."""

    def __init__(self, *args, backbone_learning_rate: float | None = None, layer_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate = backbone_learning_rate
        self.layer_decay = layer_decay

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # `compute_metrics` is not told which split it scores; a DetectionEvaluator with per-split ground truth is,
        # by the prefix its metrics are reported under ("eval", "test"). A dict of eval sets comes back here once per
        # set, with the prefix "eval_<name>".
        if isinstance(self.compute_metrics, DetectionEvaluator) and not isinstance(
                self.eval_dataset if eval_dataset is None else eval_dataset, dict):
            self.compute_metrics.select(metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def evaluation_loop(self, *args, **kwargs):
        # transformers ends every evaluation loop with `self.gather_function = accelerator.gather_for_metrics`,
        # dropping `use_gather_object`: from the second evaluation of a Trainer on, the per-image label dicts would be
        # gathered as tensors and every tensor in them cut to the batch remainder (multi-process runs only).
        self.gather_function = (self._gather_objects_on_cpu if self.args.eval_use_gather_object
                                else self.accelerator.gather_for_metrics)
        return super().evaluation_loop(*args, **kwargs)

    def _gather_objects_on_cpu(self, data):
        # Objects are pickled to every process; a CUDA tensor would be unpickled onto its sender's GPU in every
        # process (a CUDA context per GPU pair), so CPU copies travel instead.
        return self.accelerator.gather_for_metrics(send_to_device(data, "cpu"), use_gather_object=True)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            backbone_lr = self.backbone_learning_rate or self.args.learning_rate
            groups = parameter_groups(model, self.args.learning_rate, backbone_lr, self.layer_decay,
                                      self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def stage_epochs(num_train_epochs: float, freeze_backbone_epochs: float) -> tuple[float, float]:
    """(epochs of stage one, epochs of stage two): stage one takes up to `freeze_backbone_epochs` of the total."""
    stage_one = min(freeze_backbone_epochs, num_train_epochs)
    return stage_one, num_train_epochs - stage_one


def train_in_stages(model, training_args, stage_args, make_trainer):
    """Stage one (frozen backbone), then stage two (backbone trains), each its own Trainer and DDP wrap, each with
    its own checkpoints under output_dir/stage1, output_dir/stage2. `make_trainer(args)` builds a stage's Trainer.
    Returns the last trainer and per-stage train metrics.

    `training_args.resume_from_checkpoint`: "true" continues from the latest checkpoint of the stage the run
    stopped in (a finished stage one is not trained again); a path to one `checkpoint-N` folder under
    output_dir/stage1 or output_dir/stage2 continues from exactly that one.
    """
    stage_one, stage_two = stage_epochs(training_args.num_train_epochs, stage_args.freeze_backbone_epochs)
    stages = [(1, stage_one, False), (2, stage_two, True)]
    output_dir = Path(training_args.output_dir)
    resume, given_checkpoint = _resume_request(training_args.resume_from_checkpoint, output_dir)
    stage_one_done = output_dir / "stage1" / "completed"
    earlier = [output_dir / name for name in ("stage1", "stage2") if (output_dir / name).exists()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process looks before any creates this run's stage folders
    if earlier and not resume:
        # An earlier run's marker and checkpoints would be mistaken for this run's on a later resume.
        if not stage_args.overwrite_output_dir:
            raise ValueError(f"{output_dir} holds the stages of an earlier run ({', '.join(map(str, earlier))}): "
                             "continue it with --resume_from_checkpoint true, start over with "
                             "--overwrite_output_dir true (deletes them), or choose another --output_dir.")
        with training_args.main_process_first(desc="removing the earlier run's stages"):
            if training_args.process_index == 0:
                for folder in earlier:
                    shutil.rmtree(folder, ignore_errors=True)
    trainer, metrics = None, {}
    for number, epochs, train_backbone in stages:
        if epochs <= 0:
            continue
        stage_dir = output_dir / f"stage{number}"
        given_stage = given_checkpoint.parent.name if given_checkpoint is not None else None
        if number == 1 and resume and (given_stage == "stage2" or (given_stage is None and stage_one_done.exists())):
            logger.info("Resuming in stage two: skipping stage one (%s).", stage_dir)
            continue
        set_trainable(model, train_backbone, stage_args.unfreeze_last_blocks)
        logger.info("Stage %d: %g epoch(s), %s backbone, %s trainable parameters.", number, epochs,
                    "training the" if train_backbone else "frozen", f"{count_trainable(model):,}")
        args = dataclasses.replace(training_args, output_dir=str(stage_dir), num_train_epochs=epochs,
                                   push_to_hub=False, resume_from_checkpoint=None)
        trainer = make_trainer(args)
        checkpoint = None
        if given_stage == stage_dir.name:
            checkpoint = str(given_checkpoint)
        elif resume and given_stage is None:
            checkpoint = get_last_checkpoint(str(stage_dir)) if stage_dir.is_dir() else None
        if resume and number == 2 and checkpoint is None and stage_one_done.exists():
            _load_weights(model, stage_one_done.parent / "final")
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics.update({f"stage{number}_{key}": value for key, value in result.metrics.items()})
        if number == 1:
            trainer.save_model(str(stage_one_done.parent / "final"))
            if trainer.is_world_process_zero():
                stage_one_done.write_text("stage one finished\n")
    return trainer, metrics


def _resume_request(value, output_dir: Path) -> tuple[bool, Path | None]:
    """(whether to resume, the checkpoint folder asked for or None for "the latest") from --resume_from_checkpoint."""
    if value is None or str(value).lower() in ("", "false"):
        return False, None
    if str(value).lower() == "true" or value is True:
        return True, None
    checkpoint = Path(value).resolve()
    if not checkpoint.is_dir() or checkpoint.parent.name not in ("stage1", "stage2") or \
            checkpoint.parent.parent != output_dir.resolve():
        raise ValueError(f"--resume_from_checkpoint {value}: give 'true', or a checkpoint folder of this run "
                         f"({output_dir}/stage1/checkpoint-N or {output_dir}/stage2/checkpoint-N).")
    return True, checkpoint


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    logger.info("Loaded the stage-one weights from %s.", folder)
