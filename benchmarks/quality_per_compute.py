"""What training compute buys: test mAP against training CPU-seconds for our detector and transformers' LW-DETR (and
DETR on our backbone), trained from scratch through the same data pipeline on the built-in "dense-small" layout, at
1x, 2x and 4x a budget.

    python benchmarks/quality_per_compute.py --work_dir outputs/quality-per-compute [--unit_cpu_minutes 6] \
        [--budgets 1,2,4] [--models ours,lwdetr] [--seeds 42] [--train_images 1000] [--eval_images 150] \
        [--jobs 2] [--threads 1] [--json results.json] [--ours_config '{"neck_blocks": 1}' --tag=-neck1] \
        [--seconds_per_step '{"ours": 1.05, "lwdetr": 1.94}']

Data: `make_synthetic_detection_dataset(layout="dense-small")`: 256x256 images, 6-24 shapes of 10-40 px (5 classes)
on cluttered backgrounds; `--train_images` for training, `--eval_images` each for validation (unused) and test.
Made once under `--work_dir/data` and shared by every run.

Models (random weights, matched as in benchmarks/throughput.py): ours is the "small" preset (DiT hidden 64, depth 4,
4 heads, taps 2 and 4, neck scales 2, 1, 0.5, 3-layer deformable decoder with lite box refinement, 4 query groups,
relative box update, anchors of 3.2 tokens) at 256x256 with pixel patches of 8 (32x32 tokens) and `NUM_QUERIES`
queries (a dense image has up to 24 objects); LW-DETR is `throughput.lwdetr_config` of that config (the same ViT
width, depth, heads, patch and taps, our decoder's sizes and query count); "detr" is transformers'
`DetrForObjectDetection` on our DiT backbone (`throughput.detr_config`: its deepest tap, our decoder's sizes and query
count, no query groups) with `DETR_ENCODER_LAYERS` encoder layers, 0.95x ours' forward FLOPs at 256x256 (its
softmax scores reach the same COCO evaluation as sigmoid-equivalent logits). All get the same training:
`DetectionTransform` with the "light" augmentation, batch 8, AdamW lr 1e-3, weight decay 1e-4, 50 warm-up steps
then cosine, gradient clipping 1.0 (the built-in job's settings), one process, `--threads` threads, no dataloader
workers.

Budget: each (model, budget, seed) run is a child process. It first times `CALIBRATION_STEPS` training steps (data
loading included) on a throwaway copy of the model, then trains `budget x unit / seconds per step` steps, so that
both models spend the same training CPU-seconds; the table shows the CPU-seconds each training really used
(`time.process_time()` around `Trainer.train`, all threads). Then the test split is scored with COCO mAP
(`DetectionEvaluator`, the split's own records as ground truth). The calibration depends on the machine's load
(two runs on two hyper-threaded cores slow each other), so runs from different sessions may get different step
counts for one budget; `--seconds_per_step` (JSON, keyed by the table's model name, e.g. "ours-neck1", or by
"ours" / "lwdetr") skips the calibration and fixes the steps, e.g. to a calibration from an idle machine (each
result records its `calibrated_seconds_per_step`). A finished run (its `result.json` with the same
settings) is reused, so the script can be stopped and rerun. `--ours_config` (JSON of `DiTDetectionConfig` fields)
measures a variant of ours, in run folders named with `--tag`; the peers' runs (LW-DETR, DETR) are shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 256
PATCH_SIZE = 8
NUM_QUERIES = 60
BATCH_SIZE = 8
CALIBRATION_STEPS = 6
TRAINING = {"learning_rate": 1e-3, "weight_decay": 1e-4, "warmup_steps": 50, "max_grad_norm": 1.0,
            "lr_scheduler_type": "cosine"}
# Ablations that swap one part of ours for LW-DETR's, built and initialised by transformers as in LW-DETR:
# "ours+lwdetr-vit": its plain ViT backbone (learned positions, layer scale 0.1; same width, depth, heads, patch and
# taps) in place of the DiT blocks; "ours+lwdetr-projector": its multi-scale projector (per tap resampling, C2f blocks
# with BatchNorm and SiLU, LayerNorm) in place of our neck. `--ours_config` applies to every model but the peers.
MODELS = ("ours", "lwdetr", "detr", "ours+lwdetr-vit", "ours+lwdetr-projector")
PEERS = ("lwdetr", "detr")  # built from ours' config as it is, without --ours_config and --tag
# 2 layers over the deepest tap's 32x32 tokens: 0.95x ours' forward FLOPs (1: 0.82x, 3: 1.09x), by
# `throughput.forward_flops` at 256x256.
DETR_ENCODER_LAYERS = 2
# What the evaluation drops from the models' outputs, leaving (logits, pred_boxes).
NOT_EVALUATED = ["loss_dict", "auxiliary_outputs", "init_reference_points", "last_hidden_state",
                 "intermediate_hidden_states", "intermediate_reference_points", "enc_outputs_class",
                 "enc_outputs_coord_logits", "encoder_last_hidden_state"]


def make_data(work_dir: Path, train_images: int, eval_images: int) -> Path:
    """The dense-small set under work_dir/data (made once; the sizes are part of the folder name)."""
    from modeling_dit_detection.training.synthetic_data import make_synthetic_detection_dataset

    folder = work_dir / f"data-dense-small-{train_images}-{eval_images}"
    if not (folder / "dataset_dict.json").exists():
        make_synthetic_detection_dataset(num_train=train_images, num_validation=eval_images, num_test=eval_images,
                                         seed=0, layout="dense-small").save_to_disk(str(folder))
    return folder


def build_model(name: str, id2label: dict[int, str], category_ids: list[int], overrides: dict | None = None):
    from throughput import detr_config, lwdetr_config
    from transformers import DetrForObjectDetection, LwDetrForObjectDetection, LwDetrViTBackbone

    from modeling_dit_detection import DiTDetectionConfig, DiTForObjectDetection

    config = DiTDetectionConfig.from_preset("small", id2label=id2label, image_size=(IMAGE_SIZE, IMAGE_SIZE),
                                            patch_size=PATCH_SIZE, num_queries=NUM_QUERIES, category_ids=category_ids,
                                            **(overrides or {}))
    if name == "ours":
        return DiTForObjectDetection(config), config
    if name == "lwdetr":
        return LwDetrForObjectDetection(lwdetr_config(config)), config
    if name == "detr":
        return DetrForObjectDetection(detr_config(config, DETR_ENCODER_LAYERS)), config
    if name == "ours+lwdetr-vit":
        model = DiTForObjectDetection(config)
        model.model.backbone = LwDetrViTBackbone(lwdetr_config(config).backbone_config)
        return model, config
    if name == "ours+lwdetr-projector":
        model = DiTForObjectDetection(config)
        model.model.neck = LwDetrForObjectDetection(lwdetr_config(config)).model.backbone.projector
        return model, config
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def sigmoid_logits_of_softmax(logits):
    """DETR's class logits `[B, Q, C + 1]` (a softmax whose last class is "no object") -> `[B, Q, C]` logits whose
    sigmoids are its class probabilities: what the evaluator's sigmoid post-processing scores."""
    import torch

    return torch.logit(logits.float().softmax(-1)[..., :-1], eps=1e-7)


def seconds_per_step(model, loader, steps: int) -> float:
    """CPU-seconds of one training step (batch loading, forward with the loss, backward, AdamW step) on a copy."""
    import torch

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = (batch for _ in range(steps + 1) for batch in loader)  # passes over the data as needed
    timed = []
    for step in range(steps + 1):  # the first step warms up
        started = time.process_time()
        batch = next(batches)
        model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timed.append(time.process_time() - started)
    return sum(timed) / len(timed)


def run_one(model_name: str, budget_seconds: float, seed: int, data_dir: Path, out_dir: Path, threads: int,
            overrides: dict, fixed_seconds_per_step: float | None = None) -> dict:
    """Train `model_name` for `budget_seconds` CPU-seconds (by calibrated step count, or by
    `fixed_seconds_per_step` where given), score the test split. `overrides`: config fields of ours (`{}` for
    the peers, which `launch` gives none)."""
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from modeling_dit_detection import DiTDetectionImageProcessor
    from modeling_dit_detection.training.coco_metric import DetectionEvaluator
    from modeling_dit_detection.training.data import (
        DetectionTransform,
        coco_ground_truth,
        collate_fn,
        make_train_augmentation,
        prepare_detection_dataset,
    )
    from modeling_dit_detection.training.trainer import AugmentationEpoch

    torch.set_num_threads(threads)
    set_seed(seed)
    splits, id2label, category_ids = prepare_detection_dataset(datasets.load_from_disk(str(data_dir)))
    model, config = build_model(model_name, id2label, category_ids, overrides)
    processor = DiTDetectionImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                           size_divisor=config.backbone_stride)
    transform = DetectionTransform(processor, make_train_augmentation((IMAGE_SIZE, IMAGE_SIZE), "light"), seed=seed)
    train = splits["train"].with_transform(transform)
    test = splits["test"]
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(seed))
    step_seconds = fixed_seconds_per_step or seconds_per_step(model, loader, CALIBRATION_STEPS)
    steps = max(1, round(budget_seconds / step_seconds))

    evaluator = DetectionEvaluator(processor, id2label, category_ids=category_ids,
                                   ground_truths={"test": coco_ground_truth(test, id2label, category_ids)})
    evaluator.select("test")
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=16, seed=seed, logging_steps=max(1, steps // 20), save_strategy="no",
        eval_strategy="no", report_to="none", remove_unused_columns=False, batch_eval_metrics=True,
        eval_use_gather_object=True, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **TRAINING)
    preprocess = evaluator.preprocess
    if model_name == "detr":
        def preprocess(outputs, labels=None):
            return evaluator.preprocess((sigmoid_logits_of_softmax(outputs[0]), outputs[1]), labels)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_fn,
                      compute_metrics=evaluator, preprocess_logits_for_metrics=preprocess,
                      callbacks=[AugmentationEpoch(transform)])
    started = time.process_time()
    trainer.train()
    train_cpu = time.process_time() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    ignore = sorted({*getattr(model.config, "keys_to_ignore_at_inference", []), *NOT_EVALUATED})
    metrics = trainer.evaluate(test.with_transform(DetectionTransform(processor)), ignore_keys=ignore,
                               metric_key_prefix="test")
    return {"model": model_name, "seed": seed, "budget_cpu_seconds": budget_seconds, "steps": steps,
            "calibrated_seconds_per_step": step_seconds, "calibrated": fixed_seconds_per_step is None,
            "train_cpu_seconds": train_cpu,
            "parameters": sum(p.numel() for p in model.parameters()), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "test_map": metrics["test_map"],
            "test_map_50": metrics["test_map_50"], "test_map_small": metrics["test_map_small"],
            "threads": threads, "overrides": overrides}


def launch(model_name: str, budget: float, seed: int, args, data_dir: Path) -> dict:
    """One run in its own process (or its earlier result, when it finished with the same settings)."""
    overrides = json.loads(args.ours_config) if model_name not in PEERS else {}
    tag = args.tag if model_name not in PEERS else ""
    out_dir = Path(args.work_dir) / "runs" / f"{model_name}{tag}_x{budget:g}_seed{seed}"
    result_file = out_dir / "result.json"
    budget_seconds = budget * args.unit_cpu_minutes * 60
    settings = {"data": data_dir.name, "budget_cpu_seconds": budget_seconds, "threads": args.threads}
    if overrides:
        settings["overrides"] = overrides
    fixed = json.loads(args.seconds_per_step)
    fixed = fixed.get(f"{model_name}{tag}", fixed.get(model_name))
    if fixed:
        settings["seconds_per_step"] = fixed
    if result_file.exists():
        saved = json.loads(result_file.read_text())
        if saved.get("settings") == settings:
            print(f"  reusing {out_dir.name}: test mAP {saved['test_map']:.3f}", flush=True)
            return saved
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--child", model_name, "--child_budget", str(budget_seconds),
               "--child_seed", str(seed), "--child_data", str(data_dir), "--child_out", str(out_dir),
               "--threads", str(args.threads), "--ours_config", json.dumps(overrides),
               "--child_seconds_per_step", str(fixed or 0)]
    print(f"  start {out_dir.name} ({budget_seconds / 60:.0f} CPU-min)", flush=True)
    started = time.time()
    with open(out_dir / "run.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    result = {**json.loads(result_file.read_text()), "model": f"{model_name}{tag}", "budget": budget,
              "wall_minutes": (time.time() - started) / 60, "settings": settings}
    result_file.write_text(json.dumps(result, indent=1))
    print(f"  done {out_dir.name}: {result['steps']} steps, test mAP {result['test_map']:.3f}", flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | budget | steps | train CPU-min | test mAP | mAP@50 | mAP small | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["model"], r["budget"], r["seed"])):
        lines.append(f"| {r['model']} (seed {r['seed']}) | {r['budget']:g}x | {r['steps']} | "
                     f"{r['train_cpu_seconds'] / 60:.1f} | {r['test_map']:.3f} | {r['test_map_50']:.3f} | "
                     f"{r['test_map_small']:.3f} | {r['first_loss']:.2f} -> {r['last_loss']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/quality-per-compute")
    parser.add_argument("--unit_cpu_minutes", type=float, default=6.0, help="training CPU-minutes of budget 1x")
    parser.add_argument("--budgets", default="1,2,4")
    parser.add_argument("--models", default="ours,lwdetr", help=f"any of {MODELS}")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--train_images", type=int, default=1000)
    parser.add_argument("--eval_images", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--ours_config", default="{}",
                        help='JSON of DiTDetectionConfig fields that override ours, e.g. \'{"class_loss": "iou_aware"}\'')
    parser.add_argument("--tag", default="", help="suffix of ours' run folders (use one per --ours_config)")
    parser.add_argument("--seconds_per_step", default="{}",
                        help='JSON {model name: CPU-seconds per step} that fixes the steps instead of a calibration, '
                             'e.g. \'{"ours": 1.05, "lwdetr": 1.94}\'')
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child_seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child_data", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    parser.add_argument("--child_seconds_per_step", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_one(args.child, args.child_budget, args.child_seed, Path(args.child_data),
                         Path(args.child_out), args.threads, json.loads(args.ours_config),
                         args.child_seconds_per_step or None)
        (Path(args.child_out) / "result.json").write_text(json.dumps(result, indent=1))
        return None

    for option in ("ours_config", "seconds_per_step"):
        try:
            value = json.loads(getattr(args, option))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            if option == "seconds_per_step" and not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()):
                raise ValueError(f"every value must be a positive number of seconds, got {value}")
        except ValueError as error:
            parser.error(f"--{option}: {error}")
    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; choose from {MODELS}")
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    work_dir = Path(args.work_dir)
    data_dir = make_data(work_dir, args.train_images, args.eval_images)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"{args.jobs} runs at a time, {args.threads} thread(s) each; budget 1x = {args.unit_cpu_minutes:g} "
          "training CPU-minutes", flush=True)
    # Largest budgets first, so that parallel jobs finish together; models interleaved at every budget.
    plan = [(model, budget, seed) for budget in sorted(budgets, reverse=True) for seed in seeds for model in models]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda item: launch(*item, args, data_dir), plan))
    print("\n" + table(results))
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, "
                                               f"{os.cpu_count()} CPUs", "args": vars(args), "results": results},
                                              indent=1))
    return results


if __name__ == "__main__":
    main()
