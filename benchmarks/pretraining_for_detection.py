"""Does diffusion pretraining help detection? Fine-tune the same detector from a random and from an in-domain
diffusion-pretrained DiT, with the same budget and few labels, and print a markdown table of test mAP.

    python benchmarks/pretraining_for_detection.py --work_dir outputs/pretraining-experiment \
        [--pretrained DIR | --pretrain_steps 5000] [--labeled_images 200] [--max_steps 600] \
        [--rows all | NAME,NAME] [--jobs 1] [--threads N] [--json results.json] \
        [--data_args "--dataset_name cppe-5"] [--pretrain_args "..."] [--detection_args "..."]

1. Pretraining (skipped with `--pretrained`): `pretrain_dit.py` on the built-in shapes' training images, labels
   ignored, the "small" DiT (hidden 64, depth 4, patch 4, pixel space, 64x64), `--pretrain_steps` steps of 32 images
   (continued from its latest checkpoint when the folder exists).
2. Fine-tuning: `run_detection.py` on the first `--labeled_images` training images (default 200, 10% of the 2000
   the pretraining saw), `--max_steps` steps in every row at the built-in job's settings (`TRAINING_SETTINGS`),
   evaluated on the whole test split. Every row has the
   built-in "small" detector's architecture (same DiT, taps at stages 2 and 4, features at t = 0, same neck and
   head); rows differ in where the DiT's weights come from, the recipe, `feature_timestep` or taps:

   - `random/scratch`: random DiT, everything trains from step 0 at lr 1e-3 (the built-in job's recipe);
   - `random/two-stage`: random DiT under the pretrained recipe (control for `pretrained/two-stage`);
   - `pretrained/frozen`: the pretrained DiT frozen for the whole run (neck and head only);
   - `pretrained/two-stage`: frozen for 1/14 of the steps, then the DiT too at lr / 10 with layer decay 0.9;
   - `pretrained/full`: the pretrained DiT trained from step 0 at lr 1e-3 like `random/scratch` (same recipe,
     only the initial weights differ);
   - `pretrained/two-stage/t25|t100|t250`: features read at diffusion timestep 25, 100, 250 instead of 0;
   - `pretrained/two-stage/taps1,2|taps3,4`: shallower or deeper taps instead of 2,4.

Each row is a separate process (`os.wait4` gives its CPU seconds); a finished row (its `all_results.json` and the same
arguments) is reused, so the script can be stopped and rerun. The rows with two seeds are the main comparison.
`--data_args` go to both scripts (another dataset: the pretraining then sees its train split's images),
`--pretrain_args` to pretrain_dit.py only, `--detection_args` to run_detection.py only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The built-in "small" detector's head and taps, for a detector built from a diffusers DiT (whose default head is the
# 7 M-parameter one of DiT-XL/2).
# The neck, box update, anchors and refinement are pinned (in the random rows too) to those the README's rows were
# measured with, before the "small" preset moved to the relative update, 3.2-token anchors, lite refinement and the
# C2f neck.
MEASURED_HEAD = {"neck": "simple", "neck_blocks": 0, "box_update": "logit", "anchor_tokens": None,
                 "box_refinement": "iterative"}
SMALL_HEAD = {"d_model": 64, "num_queries": 20, "num_query_groups": 4, "decoder_layers": 3,
              "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "decoder_n_points": 4, **MEASURED_HEAD}
PRETRAINED_DEFAULTS = {"--out_indices": "2,4", "--feature_timestep": "0"}
# The built-in job's training settings, given explicitly to every row: run_detection.py applies them by itself only
# when neither data nor a model is named, so a row with --model_name_or_path would otherwise get the general
# defaults (lr 1e-4, 3 epochs) and a different stage split. With --max_steps, stage one is 1/14 of the steps.
TRAINING_SETTINGS = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
                     "32", "--weight_decay", "1e-4", "--warmup_steps", "50", "--max_grad_norm", "1.0",
                     "--augmentation", "light", "--num_train_epochs", "14"]
# diffusers' DiT embeds the timestep with 256 sinusoidal frequencies (fixed); the "small" preset uses 64. The random
# rows take 256 too, so that both detectors are the same architecture down to the last layer.
RANDOM_DEFAULTS = {"--config_overrides": json.dumps({"frequency_embedding_size": 256, **MEASURED_HEAD})}


@dataclass
class Row:
    name: str
    pretrained: bool
    options: dict[str, str] = field(default_factory=dict)
    seeds: tuple[int, ...] = (42,)

    def arguments(self, pretrained_dir: Path) -> list[str]:
        if not self.pretrained:
            return [part for item in {**RANDOM_DEFAULTS, **self.options}.items() for part in item]
        options = {"--model_name_or_path": str(pretrained_dir), **PRETRAINED_DEFAULTS,
                   "--config_overrides": json.dumps(SMALL_HEAD), **self.options}
        return [part for item in options.items() for part in item]


ROWS = [
    Row("random/scratch", False, {"--recipe": "scratch"}, seeds=(42, 1)),
    Row("random/two-stage", False, {"--recipe": "two-stage"}),
    Row("pretrained/frozen", True, {"--recipe": "two-stage", "--freeze_backbone_epochs": "14"}),
    Row("pretrained/two-stage", True, {"--recipe": "two-stage"}, seeds=(42, 1)),
    Row("pretrained/full", True, {"--recipe": "scratch"}, seeds=(42, 1)),
    *(Row(f"pretrained/two-stage/t{t}", True, {"--recipe": "two-stage", "--feature_timestep": str(t)})
      for t in (25, 100, 250)),
    *(Row(f"pretrained/two-stage/taps{taps}", True, {"--recipe": "two-stage", "--out_indices": taps})
      for taps in ("1,2", "3,4")),
]


def run_logged(command: list[str], log_path: Path, threads: int | None) -> tuple[int, float, float]:
    """Runs `command` with its output in `log_path`; returns (exit status, wall seconds, CPU seconds)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def pretrain(work_dir: Path, steps: int, options: list[str], threads: int | None) -> tuple[Path, dict]:
    """The pretrained DiT folder and its pretrain_results.json; reused when it was made by the same command."""
    output = work_dir / "dit-pretrained"
    command = [sys.executable, "pretrain_dit.py", "--output_dir", str(output), "--max_train_steps", str(steps),
               *options]
    record_file = work_dir / "pretraining_command.json"
    results_file = output / "pretrain_results.json"
    same_command = record_file.exists() and json.loads(record_file.read_text()) == command[1:]
    if same_command and results_file.exists():
        return output, json.loads(results_file.read_text())
    record_file.write_text(json.dumps(command[1:]))
    if same_command and (output / "checkpoints").exists():
        command += ["--resume_from_checkpoint", "latest"]  # an interrupted run of this very command
    elif output.exists():
        command += ["--overwrite_output_dir", "true"]
    print(f"Pretraining: {shlex.join(command)}", flush=True)
    status, wall, cpu = run_logged(command, work_dir / "pretrain.log", threads)
    if status != 0:
        raise SystemExit(f"pretrain_dit.py failed (exit {status}); see {work_dir / 'pretrain.log'}")
    return output, json.loads(results_file.read_text())


def fine_tune(row: Row, seed: int, pretrained_dir: Path, args: argparse.Namespace) -> dict:
    output = args.work_dir / "rows" / f"{row.name.replace('/', '_')}_seed{seed}"
    command = [sys.executable, "run_detection.py", "--output_dir", str(output), "--overwrite_output_dir", "true",
               "--max_train_samples", str(args.labeled_images), "--max_steps", str(args.max_steps),
               "--seed", str(seed), "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
               *TRAINING_SETTINGS,
               *shlex.split(args.data_args), *shlex.split(args.detection_args), *row.arguments(pretrained_dir)]
    record_file = output / "experiment_row.json"
    if record_file.exists() and json.loads(record_file.read_text())["command"] == command[1:]:
        return json.loads(record_file.read_text())
    output.mkdir(parents=True, exist_ok=True)
    log_path = output.parent / f"{output.name}.log"
    print(f"{row.name} seed {seed}: {shlex.join(command)}", flush=True)
    status, wall, cpu = run_logged(command, log_path, args.threads)
    if status != 0:
        raise RuntimeError(f"{row.name} seed {seed} failed (exit {status}); see {log_path}")
    metrics = json.loads((output / "all_results.json").read_text())
    record = {"row": row.name, "seed": seed, "steps": args.max_steps, "test_map": metrics["test_map"],
              "test_map_50": metrics["test_map_50"], "wall_seconds": wall, "cpu_seconds": cpu,
              "command": command[1:]}
    record_file.write_text(json.dumps(record, indent=1))
    return record


def markdown_table(records: list[dict]) -> str:
    lines = ["| row | seed | steps | test mAP | mAP@50 | wall min | CPU min |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['row']} | {r['seed']} | {r['steps']} | {r['test_map']:.3f} | {r['test_map_50']:.3f} | "
                     f"{r['wall_seconds'] / 60:.1f} | {r['cpu_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/pretraining-experiment"))
    parser.add_argument("--pretrained", type=Path, help="a diffusers DiT folder to use instead of pretraining one")
    parser.add_argument("--pretrain_steps", type=int, default=5000)
    parser.add_argument("--labeled_images", type=int, default=200)
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--rows", default="all", help=f"comma-separated row names or 'all': {[r.name for r in ROWS]}")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at the same time")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's)")
    parser.add_argument("--data_args", default="", help="options for both scripts, e.g. the dataset's")
    parser.add_argument("--pretrain_args", default="", help="further options for pretrain_dit.py")
    parser.add_argument("--detection_args", default="", help="further options for run_detection.py")
    parser.add_argument("--json", type=Path, help="write the rows and the pretraining's summary here")
    args = parser.parse_args(argv)

    rows = ROWS if args.rows == "all" else [r for r in ROWS if r.name in args.rows.split(",")]
    unknown = set(args.rows.split(",")) - {r.name for r in ROWS} if args.rows != "all" else set()
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {[r.name for r in ROWS]}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    pretraining = {}
    pretrained_dir = args.pretrained
    if pretrained_dir is None and any(r.pretrained for r in rows):
        pretrained_dir, pretraining = pretrain(args.work_dir, args.pretrain_steps,
                                               shlex.split(args.data_args) + shlex.split(args.pretrain_args), args.threads)
    jobs = [(row, seed) for row in rows for seed in row.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda job: fine_tune(*job, pretrained_dir, args), jobs))

    summary = {key: pretraining.get(key) for key in ("steps", "minutes", "first_loss", "final_loss")}
    print(f"\nPretraining: {summary}; fine-tuning: {args.labeled_images} labeled images, {args.max_steps} steps.")
    print(markdown_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.platform(), "pretraining": summary,
                                         "labeled_images": args.labeled_images, "max_steps": args.max_steps,
                                         "rows": records}, indent=1))


if __name__ == "__main__":
    main()
