"""The `Trainer` of one stage: layer-wise decayed backbone learning rates, object gathers for evaluation, a
training loss kept over a whole stage across resumes, and a stop at the first non-finite loss."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..modeling_dit_backbone import DiTBackbone
from .coco_metric import DetectionEvaluator
from .feature_cache import real_backbone
from .streaming import StreamDataCheck, gather_issues, streaming_collate_fn, write_stage_issues

logger = logging.getLogger(__name__)
_BLOCK = re.compile(r"(?:^|\.)backbone\.layers\.(\d+)\.")


def _backbone(model: nn.Module) -> DiTBackbone:
    return real_backbone(model)  # also while a FrozenFeatureCache stands in for it (stage one)


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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the optimiser step, so no weight is corrupted."""


class StageLoss(TrainerCallback, ExportableState):
    """The sum and count of the training batches' losses of a stage. Saved in every checkpoint (the Trainer's
    `stateful_callbacks`) and restored on resume, so a resumed stage reports the mean over all of its batches, where
    the Trainer's own `train_loss` covers only the steps run since the resume."""

    def __init__(self, total: float = 0.0, batches: int = 0):
        self.total, self.batches = total, batches

    def state(self) -> dict:
        return {"args": {"total": self.total, "batches": self.batches}, "attributes": {}}


class AugmentationEpoch(TrainerCallback):
    """Tells a `DetectionTransform` which epoch starts, so its random augmentation differs between epochs and is
    reproduced exactly by a resumed run (workers are re-created each epoch, so they see the new epoch too; with
    `--dataloader_persistent_workers` they would not)."""

    def __init__(self, transform):
        self.transform = transform

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.transform.epoch = int(state.epoch + 1e-6)  # a resumed epoch starts part-way: 1.33 is epoch 1


class DetectionTrainer(Trainer):
    """`Trainer` whose optimiser gives the backbone its own, layer-wise decayed learning rate, whose every
    evaluation gathers per-image labels as objects and is scored by its `DetectionEvaluator` against the ground truth
    of the split it evaluates (chosen by `metric_key_prefix`), whose `train_loss` covers the whole stage (resumes
    included), and which stops at the first non-finite training loss, naming the step and the batch's images."""

    def __init__(self, *args, backbone_learning_rate: float | None = None, layer_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_learning_rate = backbone_learning_rate
        self.layer_decay = layer_decay
        self.add_callback(StageLoss())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = (result[0] if return_outputs else result).detach()
            self._check_finite(loss, inputs)
            tracker = self.callback_handler.callbacks[self._stage_loss_index()]
            tracker.total += float(loss)
            tracker.batches += 1
        return result

    def _stage_loss_index(self) -> int:
        # Resuming replaces the callback object with the restored one: look it up, never keep a reference.
        return next(i for i, c in enumerate(self.callback_handler.callbacks) if isinstance(c, StageLoss))

    def _check_finite(self, loss: torch.Tensor, inputs) -> None:
        finite = torch.isfinite(loss).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process stops at the same step, or the others would wait forever in the next collective.
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() == 1.0:
            return
        image_ids = [int(label["image_id"]) for label in inputs.get("labels", []) if "image_id" in label]
        raise NonFiniteLossError(
            f"Non-finite training loss ({loss.item()} on this process) at step {self.state.global_step + 1} of "
            f"{self.args.output_dir}, batch with image_ids {image_ids}. Stopped before the optimiser step: no weight "
            "was changed and the last checkpoint is intact. Check those images' boxes, or lower --learning_rate / "
            "raise --warmup_steps, then --resume_from_checkpoint true.")

    def get_train_dataloader(self):
        if not getattr(self.train_dataset, "split_by_node", False):
            return super().get_train_dataloader()
        # A stream already split between the processes (`StreamedTrainSet`): each process loads its own part. Through
        # `accelerator.prepare` it would be dispatched from process 0 (Accelerate's default for iterable datasets) or
        # sharded a second time; prepared as a one-process loader it only moves batches to the device.
        from accelerate.data_loader import prepare_data_loader

        args = self.args
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=streaming_collate_fn,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None)
        return prepare_data_loader(loader, device=args.device, num_processes=1, process_index=0, put_on_device=True,
                                   dispatch_batches=False, non_blocking=self.accelerator.non_blocking)

    def training_step(self, model, inputs, *args, **kwargs):
        issues = inputs.pop("data_issues", None)  # a streamed batch's data-check findings: counted, not a model input
        if issues:
            self._callback(StreamDataCheck).add(issues)
        return super().training_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Only the main process writes trainer_state.json: before it does, every process gets the union of the streamed
        # records' findings, so a resume restores all processes' (every process calls this, a collective is safe).
        if any(isinstance(c, StreamDataCheck) for c in self.callback_handler.callbacks):
            check = self._callback(StreamDataCheck)
            check.issues = gather_issues(check.issues)
        return super()._save_checkpoint(model, trial)

    def _callback(self, kind):
        return next(c for c in self.callback_handler.callbacks if isinstance(c, kind))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if getattr(self.train_dataset, "split_by_node", False) and not any(
                isinstance(c, StreamDataCheck) for c in self.callback_handler.callbacks):
            self.add_callback(StreamDataCheck())
        if resume_from_checkpoint:
            self._restore_stage_loss(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if any(isinstance(c, StreamDataCheck) for c in self.callback_handler.callbacks):
            issues = gather_issues(self._callback(StreamDataCheck).issues)
            if self.is_world_process_zero():
                write_stage_issues(Path(self.args.output_dir), issues)
        tracker = self.callback_handler.callbacks[self._stage_loss_index()]
        totals = torch.tensor([tracker.total, float(tracker.batches)], dtype=torch.float64, device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        if totals[1] > 0:
            output.metrics["train_loss"] = float(totals[0] / totals[1])
        return output

    def _restore_stage_loss(self, checkpoint: str) -> None:
        # The Trainer restores callback states only with --restore_callback_states_from_checkpoint; this one is part
        # of what a resume must restore, so it is read back from the checkpoint's trainer_state.json here.
        # The streamed records' data-check findings likewise (the batches a resume skips never reach training).
        stored = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks", {})
        saved = stored.get(StageLoss.__name__)
        if saved:
            saved = saved[0] if isinstance(saved, list) else saved
            tracker = self.callback_handler.callbacks[self._stage_loss_index()]
            tracker.total, tracker.batches = saved["args"]["total"], saved["args"]["batches"]
        saved = stored.get(StreamDataCheck.__name__)
        if saved and any(isinstance(c, StreamDataCheck) for c in self.callback_handler.callbacks):
            saved = saved[0] if isinstance(saved, list) else saved
            self._callback(StreamDataCheck).add([(int(k), v) for k, v in saved["args"]["issues"].items()])

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
        if isinstance(data, torch.Tensor):
            # The per-image losses: a tensor of the batch's size, gathered as one. As objects they would arrive as a
            # list of 0-d arrays, which the Trainer cannot concatenate (a process with a single eval batch crashed).
            return self.accelerator.gather_for_metrics(data)
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


