"""Peak memory of a Trainer evaluation against the number of eval images: ours vs. keeping every output.

    python benchmarks/eval_memory.py                 # sizes 128 512 2048, both modes, a table on stdout

"per-batch" is what run_detection.py does: `batch_eval_metrics=True` with `DetectionEvaluator.preprocess` as
`preprocess_logits_for_metrics`, so each batch is reduced to its top-100 detections per image and handed to the
evaluator right away, which scores them against the eval split's COCO ground truth at the end. "keep-all" is the Trainer's default pattern behind transformers#34675: the raw logits and boxes of the
whole eval set are kept (per batch) and scored in one `compute_metrics` call at the end. The model is a tiny DiT detector with 300
queries and 80 classes (COCO's shape of the outputs), so output size, not model size, dominates.

Each (mode, size) runs in its own process; the number is the growth of the peak resident set size (ru_maxrss)
over the peak of a one-batch warm-up evaluation, in MiB, on the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

QUERIES, CLASSES, IMAGE = 300, 80, 64
BOXES = [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]  # every image's two objects: cx, cy, w, h normalised


def _classes_of(index: int) -> list[int]:
    """The categories of image `index`'s two objects."""
    return [index % CLASSES, (index + 1) % CLASSES]


def _child(size: int, mode: str) -> dict:
    import torch
    from transformers import EvalPrediction, Trainer, TrainingArguments

    from modeling_dit_detection import DiTDetectionConfig, DiTDetectionImageProcessor, DiTForObjectDetection
    from modeling_dit_detection.training.coco_metric import DetectionEvaluator

    torch.manual_seed(0)
    id2label = {i: f"class_{i}" for i in range(CLASSES)}
    config = DiTDetectionConfig.from_preset("tiny", id2label=id2label, num_queries=QUERIES, num_query_groups=1)
    model = DiTForObjectDetection(config).eval()
    processor = DiTDetectionImageProcessor(size={"height": IMAGE, "width": IMAGE}, size_divisor=config.backbone_stride)

    class RandomImages(torch.utils.data.Dataset):
        def __len__(self):
            return size

        def __getitem__(self, index):
            generator = torch.Generator().manual_seed(index)
            return {"pixel_values": torch.rand(3, IMAGE, IMAGE, generator=generator) * 2 - 1,
                    "labels": {"class_labels": torch.tensor(_classes_of(index)), "boxes": torch.tensor(BOXES),
                               "image_id": torch.tensor([index]), "orig_size": torch.tensor([IMAGE, IMAGE])}}

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": [e["labels"] for e in examples]}

    # The eval set's COCO ground truth, as run_detection.py builds it from the records (`data.coco_ground_truth`).
    xywh = [[(cx - w / 2) * IMAGE, (cy - h / 2) * IMAGE, w * IMAGE, h * IMAGE] for cx, cy, w, h in BOXES]
    ground_truth = {"images": [{"id": i, "width": IMAGE, "height": IMAGE} for i in range(size)],
                    "annotations": [{"id": 2 * i + k + 1, "image_id": i, "category_id": c, "bbox": box,
                                     "area": box[2] * box[3], "iscrowd": 0}
                                    for i in range(size) for k, (c, box) in enumerate(zip(_classes_of(i), xywh))],
                    "categories": [{"id": i, "name": name} for i, name in id2label.items()]}
    evaluator = DetectionEvaluator(processor, id2label, ground_truths={"eval": ground_truth})
    per_batch = mode == "per-batch"

    def keep_all_metrics(eval_pred):
        # Every batch's raw outputs were kept (eval_do_concat_batches=False keeps them per batch, so per-image label
        # dicts are not concatenated into nonsense, transformers#25939); score them now, batch by batch.
        batches = list(zip(eval_pred.predictions, eval_pred.label_ids))
        for index, (outputs, labels) in enumerate(batches):
            metrics = evaluator(EvalPrediction(predictions=outputs, label_ids=labels),
                                compute_result=index == len(batches) - 1)
        return metrics

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, per_device_eval_batch_size=32, report_to="none",
                                 batch_eval_metrics=per_batch, eval_use_gather_object=True,
                                 eval_do_concat_batches=per_batch,
                                 remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, eval_dataset=RandomImages(), data_collator=collate,
                          compute_metrics=evaluator if per_batch else keep_all_metrics,
                          preprocess_logits_for_metrics=evaluator.preprocess if per_batch else None)
        # A warm-up evaluation on one batch: libraries loaded, allocator pools sized; what follows is the growth.
        trainer.evaluate(eval_dataset=torch.utils.data.Subset(RandomImages(), range(32)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        metrics = trainer.evaluate()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "size": size, "peak_growth_mib": round((after - before) / 1024, 1),
            "map": metrics["eval_map"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1])))
        return
    print("| eval images | per-batch (ours): peak growth MiB | keep-all (Trainer default): peak growth MiB |")
    print("|---|---|---|")
    for size in args.sizes:
        row = []
        for mode in ("per-batch", "keep-all"):
            out = subprocess.run([sys.executable, __file__, "--child", str(size), mode], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            row.append(json.loads(out)["peak_growth_mib"])
        print(f"| {size} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
