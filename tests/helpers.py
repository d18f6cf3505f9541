"""Shared builders for the tests: tiny configs, valid targets, the run_detection.py, pretrain_dit.py, app.py and
benchmark scripts as modules."""

import importlib.util
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from modeling_dit_detection import DiTDetectionConfig


def tiny_config(preset: str = "tiny", **overrides) -> DiTDetectionConfig:
    """A detector of a few ten thousand parameters: pixel-space ("tiny") or with a tiny VAE ("tiny-latent")."""
    overrides.setdefault("id2label", {0: "circle", 1: "square", 2: "triangle"})
    return DiTDetectionConfig.from_preset(preset, **overrides)


def random_labels(batch_size: int, num_labels: int, boxes_per_image=(2, 0), seed: int = 0) -> list[dict]:
    """Valid targets: `boxes_per_image[i]` boxes for image i (0 = no objects), cx, cy, w, h inside the image."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for i in range(batch_size):
        n = boxes_per_image[i % len(boxes_per_image)]
        size = 0.1 + 0.3 * torch.rand(n, 2, generator=generator)
        center = size / 2 + (1 - size) * torch.rand(n, 2, generator=generator)
        labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                       "boxes": torch.cat([center, size], dim=1)})
    return labels


def coco_map(predictions: list[dict], labels: list[dict], image_size: tuple[int, int], num_labels: int) -> dict:
    """COCO box mAP from the reference code (pycocotools) for post-processed `predictions` (x0, y0, x1, y1 pixels)
    against `labels` (cx, cy, w, h normalised); returns {"map", "map_50", "map_75"}."""
    height, width = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    ground_truth = {"images": [{"id": i, "height": height, "width": width} for i in range(len(labels))],
                    "categories": [{"id": c} for c in range(num_labels)], "annotations": []}
    for image_id, target in enumerate(labels):
        for category, box in zip(target["class_labels"].tolist(), (target["boxes"] * scale).tolist()):
            cx, cy, w, h = box
            ground_truth["annotations"].append({"id": len(ground_truth["annotations"]) + 1, "image_id": image_id,
                                                "category_id": category, "bbox": [cx - w / 2, cy - h / 2, w, h],
                                                "area": w * h, "iscrowd": 0})
    detections = [{"image_id": image_id, "category_id": label, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                  for image_id, result in enumerate(predictions)
                  for score, label, (x0, y0, x1, y1) in zip(result["scores"].tolist(), result["labels"].tolist(),
                                                            result["boxes"].tolist())]
    stats = cocoeval_stats(ground_truth, detections)
    return {"map": stats[0], "map_50": stats[1], "map_75": stats[2]}


def cocoeval_stats(ground_truth: dict, detections: list[dict]):
    """pycocotools' 12 summary stats of COCO `detections` (results format) against a COCO `ground_truth` dict."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


ROOT = Path(__file__).resolve().parents[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a test's child processes: one compute thread each. Several children of 2 threads each on
    a 2-core machine oversubscribe it, and a loaded machine then turns seconds into minutes."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _load_script(name: str):
    """The top-level script <name>.py as a module named `name` (the scripts are not part of the installed package);
    registered in sys.modules before it runs, since dataclasses look their module up there."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_run_detection():
    return _load_script("run_detection")


def load_app():
    """The demo app.py (it needs gradio, the `demo` extra)."""
    return _load_script("app")


def load_pretrain_dit():
    """pretrain_dit.py; the repository root goes on sys.path, as when the script runs, since it reads detection
    datasets with run_detection.py's loading."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return _load_script("pretrain_dit")


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module; benchmarks/ goes on sys.path, as when the script runs, since the
    scripts import each other by name."""
    benchmarks = str(ROOT / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    return importlib.import_module(name)


# A few-second run_detection.py job: tiny model, built-in data, 24 training images in batches of 8 (3 steps per
# epoch), one epoch per stage.
SMALL_JOB = ["--model_preset", "tiny", "--synthetic_train_size", "24", "--synthetic_eval_size", "6",
             "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--num_train_epochs", "2",
             "--freeze_backbone_epochs", "1", "--learning_rate", "1e-3", "--backbone_learning_rate", "5e-4",
             "--warmup_steps", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
             "--report_to", "tensorboard", "--preview_images", "4"]


class StageRecorder(TrainerCallback):
    """Records, per Trainer run (= stage): its output folder, the steps it ran, and what happened to the weights.
    `fail_at=("stage2", 4)` raises after that stage's step 4, as a crash would."""

    def __init__(self, fail_at: tuple[str, int] | None = None):
        self.runs, self.fail_at = [], fail_at

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        backbone = {k: v.detach().clone() for k, v in model.model.backbone.state_dict().items()}
        head = {k: v.detach().clone() for k, v in model.class_heads.state_dict().items()}
        trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
        self.runs.append({"stage": args.output_dir.rstrip("/").rsplit("/", 1)[-1], "backbone": backbone,
                          "head": head, "steps": [], "trainable": trainable})

    def on_step_end(self, args, state, control, **kwargs):
        run = self.runs[-1]
        run["steps"].append(state.global_step)
        if (run["stage"], state.global_step) == self.fail_at:
            raise RuntimeError("simulated crash")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        run = self.runs[-1]
        run["backbone_changed"] = {k: not torch.equal(v, run["backbone"][k])
                                   for k, v in model.model.backbone.state_dict().items()}
        run["head_changed"] = any(not torch.equal(v, run["head"][k]) for k, v in model.class_heads.state_dict().items())
