"""Two-stage training: stage one trains the neck and head on a frozen DiT; stage two also trains the backbone (all of
it, or its last blocks) at a smaller, layer-wise decayed learning rate. Each stage is its own `Trainer`, so each is
its own DDP wrap: a parameter that starts requiring gradients after DDP wrapped the model would never be all-reduced.
The VAE encoder is always frozen. Also here: what an output folder may hold before a run, and which checkpoint a
resume continues from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

from torch import nn

from ..modeling_dit_backbone import DiTBackbone, freeze_vae
from .feature_cache import FeatureCaching, real_backbone

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a saved model folder holds; a run must not overwrite one silently.
_MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")


def _backbone(model: nn.Module) -> DiTBackbone:
    return real_backbone(model)  # also while a FrozenFeatureCache stands in for it


def set_trainable(model: nn.Module, train_backbone: bool, unfreeze_last_blocks: int | None = None) -> None:
    """Freeze or unfreeze the backbone. With `unfreeze_last_blocks=K`, only its last K blocks train (the patch
    embedding, the conditioning and the earlier blocks stay frozen). Everything outside the backbone trains,
    except the VAE encoder, which never does."""
    backbone = _backbone(model)
    model.requires_grad_(True)
    backbone.requires_grad_(False)
    if train_backbone:
        num_blocks = len(backbone.layers)
        first = 0 if unfreeze_last_blocks is None else max(0, num_blocks - unfreeze_last_blocks)
        if first == 0:
            backbone.requires_grad_(True)
        else:
            for block in backbone.layers[first:]:
                block.requires_grad_(True)
    freeze_vae(model)


def check_unfreeze_last_blocks(model: nn.Module, unfreeze_last_blocks: int | None) -> None:
    """`--unfreeze_last_blocks` cannot name more blocks than the backbone runs."""
    num_blocks = len(_backbone(model).layers)
    if unfreeze_last_blocks is not None and unfreeze_last_blocks > num_blocks:
        raise ValueError(f"--unfreeze_last_blocks {unfreeze_last_blocks}: the DiT runs {num_blocks} blocks (up to its "
                         f"deepest tap); give 1 to {num_blocks}, or leave the flag out to train the whole DiT.")


def count_trainable(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool, model_source: str | None = None) -> None:
    """Refuse, unless `overwrite`, a new run into a folder that holds an earlier run's stages or a saved model (the
    model, its config and its card would be overwritten), including the folder the model is loaded from; with
    `overwrite`, delete the earlier stages. `resume` needs something to resume."""
    stage_dirs = [output_dir / name for name in ("stage1", "stage2") if (output_dir / name).exists()]
    if resume:
        if not stage_dirs:
            raise ValueError(f"--resume_from_checkpoint: {output_dir} holds no earlier run of this script (no "
                             "stage1/ or stage2/ folder): nothing to resume. Check --output_dir, or leave the flag "
                             "out to start a new run.")
        return
    saved_model = [output_dir / name for name in _MODEL_FILES if (output_dir / name).is_file()]
    same_as_source = model_source is not None and Path(model_source).exists() and \
        Path(model_source).resolve() == output_dir.resolve()
    if (stage_dirs or saved_model or same_as_source) and not overwrite:
        what = ("the model it is loaded from (--model_name_or_path)" if same_as_source else
                f"an earlier run ({', '.join(str(p) for p in stage_dirs + saved_model)})")
        raise ValueError(f"--output_dir {output_dir} holds {what}: continue an interrupted run with "
                         "--resume_from_checkpoint true, start over with --overwrite_output_dir true (replaces it), "
                         "or choose another --output_dir.")
    for folder in stage_dirs:  # an earlier run's marker and checkpoints would be mistaken for this run's
        shutil.rmtree(folder, ignore_errors=True)


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of a stage that were saved to the end, newest first. The Trainer writes
    `trainer_state.json` last, so a save that was killed leaves a folder without it (or with a truncated one)."""
    found = sorted((int(m.group(1)), path) for path in stage_dir.glob("checkpoint-*")
                   if (m := _CHECKPOINT.match(path.name)) and path.is_dir())
    complete = []
    for _, path in reversed(found):
        problem = _checkpoint_problem(path)
        if problem:
            logger.warning("Skipping %s: %s (an interrupted save); it can be deleted.", path, problem)
        else:
            complete.append(path)
    return complete


def _checkpoint_problem(path: Path) -> str | None:
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return "no model weights"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except json.JSONDecodeError:
        return "a truncated trainer_state.json"
    return None


def prepare_output_dir(training_args, overwrite: bool, model_source: str | None = None) -> None:
    """Before a run: `check_output_dir` on the main process (which deletes an earlier run's stages when told to),
    every process waiting for it."""
    resume, _ = resume_request(training_args.resume_from_checkpoint, Path(training_args.output_dir))
    with training_args.main_process_first(desc="checking the output folder"):
        if training_args.process_index == 0:
            check_output_dir(Path(training_args.output_dir), resume, overwrite, model_source)


def train_in_stages(model, training_args, plan, make_trainer, feature_caching: FeatureCaching | None = None):
    """Stage one (frozen backbone), then stage two (backbone trains), as `plan` (a `StagePlan`) lays them out, each
    its own Trainer and DDP wrap, each with its own checkpoints under output_dir/stage1, output_dir/stage2.
    `make_trainer(args, model)` builds a stage's Trainer. Returns the last trainer (None if nothing was left to
    train), the model as trained last, and the train metrics of both stages, `stage1_*` and `stage2_*`, also for a
    stage finished before a resume.

    Where stage one's Trainer sharded the model in place (FSDP, DeepSpeed: `wraps_model_in_place`), stage two trains
    a new model built from stage one's saved weights: FSDP refuses to wrap a model that holds FSDP units, and a
    second DeepSpeed engine on the same modules would hook them twice.

    `feature_caching` (`--cache_frozen_features`): stage one runs with flip-only augmentation and the backbone's
    feature maps cached (`FeatureCaching.serving`), and reports `stage1_feature_cache_*`; the backbone is back in
    place before anything is saved after the stage, and stage two runs as without it.

    `training_args.resume_from_checkpoint`: "true" continues from the newest complete checkpoint of the stage the
    run stopped in (a finished stage one is not trained again); a path to one `checkpoint-N` folder under
    output_dir/stage1 or output_dir/stage2 continues from exactly that one.
    """
    output_dir = Path(training_args.output_dir)
    resume, given_checkpoint = resume_request(training_args.resume_from_checkpoint, output_dir)
    stage_one_done = output_dir / "stage1" / "completed"
    given_stage = given_checkpoint.parent.name if given_checkpoint is not None else None
    trainer, metrics = None, {}
    for number, length, train_backbone in [(1, plan.stage_one, False), (2, plan.stage_two, True)]:
        stage_dir = output_dir / f"stage{number}"
        if length <= 0:
            continue
        if number == 1 and resume and (given_stage == "stage2" or (given_stage is None and stage_one_done.exists())):
            logger.info("Resuming in stage two: stage one is finished (%s).", stage_dir)
            metrics.update(_read_stage_metrics(stage_dir, number))
            continue
        set_trainable(model, train_backbone, plan.unfreeze_last_blocks)
        logger.info("Stage %d: %g %s, %s backbone, %s trainable parameters.", number, length,
                    "steps" if plan.in_steps else "epochs", "training the" if train_backbone else "frozen",
                    f"{count_trainable(model):,}")
        length_args = {"max_steps": int(length)} if plan.in_steps else {"num_train_epochs": length}
        args = dataclasses.replace(training_args, output_dir=str(stage_dir), push_to_hub=False,
                                   resume_from_checkpoint=None, **length_args)
        trainer = make_trainer(args, model)
        checkpoint = None
        if given_stage == stage_dir.name:
            checkpoint = str(given_checkpoint)
        elif resume and given_stage is None:
            checkpoints = complete_checkpoints(stage_dir)
            checkpoint = str(checkpoints[0]) if checkpoints else None
        if resume and number == 2 and checkpoint is None and stage_one_done.exists():
            _load_weights(model, stage_one_done.parent / "final")
        if checkpoint is not None:
            logger.info("Resuming stage %d from %s.", number, checkpoint)
        caching = feature_caching if number == 1 else None
        with caching.serving(model, trainer) if caching else contextlib.nullcontext() as cache:
            result = trainer.train(resume_from_checkpoint=checkpoint)
            if cache is not None:
                result.metrics.update(caching.metrics(cache, trainer.args.device))
        stage_metrics = {f"stage{number}_{key}": value for key, value in result.metrics.items()}
        metrics.update(stage_metrics)
        if trainer.is_world_process_zero():
            (stage_dir / "train_results.json").write_text(json.dumps(stage_metrics, indent=2) + "\n")
        if number == 1:
            trainer.save_model(str(stage_one_done.parent / "final"))
            if trainer.is_world_process_zero():
                stage_one_done.write_text("stage one finished\n")
            if plan.stage_two > 0 and wraps_model_in_place(trainer):
                trainer.accelerator.wait_for_everyone()  # the main process wrote the weights
                model = unwrapped_copy(model, stage_one_done.parent / "final")
                logger.info("Stage two trains a new model built from stage one's weights (the sharded model "
                            "cannot be wrapped again).")
    return trainer, model, metrics


def wraps_model_in_place(trainer) -> bool:
    """Whether `trainer` changed the model's own modules when it wrapped it: FSDP replaces the wrapped blocks by
    FSDP units, DeepSpeed partitions parameters (ZeRO-3) and hooks them. DDP leaves the model as it was."""
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def unwrapped_copy(model, folder: Path):
    """A new model of `model`'s configuration with the weights saved in `folder` (a `save_model` folder)."""
    from ..modeling_dit_detection import DiTForObjectDetection

    copy = DiTForObjectDetection(model.config)
    _load_weights(copy, folder)
    return copy


def _read_stage_metrics(stage_dir: Path, number: int) -> dict:
    path = stage_dir / "train_results.json"
    if not path.is_file():
        logger.warning("%s is missing: the stage-%d metrics of the earlier part of the run are not reported.", path,
                       number)
        return {}
    return json.loads(path.read_text())


def resume_request(value, output_dir: Path) -> tuple[bool, Path | None]:
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
    problem = _checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"--resume_from_checkpoint {value}: {problem} (an interrupted save). Give an earlier "
                         "checkpoint, or 'true' for the newest complete one.")
    return True, checkpoint


def remove_stage_one_model(output_dir: Path) -> None:
    """Delete output_dir/stage1/final, stage one's whole model (2.1 GB at DiT-XL/2), once the run's model is saved in
    output_dir. It is kept until then because a resume in stage two starts from it when stage two has no checkpoint
    (always so with --save_strategy no); after the run nothing reads it."""
    folder = output_dir / "stage1" / "final"
    if folder.is_dir():
        shutil.rmtree(folder)
        logger.info("Removed stage one's model (%s): the run's model is in %s.", folder, output_dir)


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"--resume_from_checkpoint: stage one is finished but its model ({folder}) is gone, and stage "
                         "two has no checkpoint to continue from: the run finished (its model is in "
                         f"{folder.parent.parent}) and there is nothing to resume. Start over with "
                         "--overwrite_output_dir true.")
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    logger.info("Loaded the stage-one weights from %s.", folder)
