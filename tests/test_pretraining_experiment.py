"""benchmarks/pretraining_for_detection.py: the rows it runs compare like with like (the same detector
architecture from a random and from a pretrained DiT), and the script runs end to end. No timings asserted."""

import json

import pytest
from helpers import load_benchmark

experiment = load_benchmark("pretraining_for_detection")

# Configuration fields that do not describe the architecture.
NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype"}


def architecture(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}
    config["backbone_config"] = {k: v for k, v in config["backbone_config"].items() if k not in NOT_ARCHITECTURE}
    return config


def test_every_row_has_a_unique_name_and_the_pretrained_rows_use_the_pretrained_dit():
    names = [row.name for row in experiment.ROWS]
    assert len(names) == len(set(names))
    for row in experiment.ROWS:
        arguments = row.arguments(experiment.Path("dit"))
        assert ("--model_name_or_path" in arguments) == row.pretrained, row.name
        assert arguments.count("--recipe") == 1, row.name  # explicit, never the default that follows the weights


@pytest.mark.slow
def test_random_and_pretrained_rows_train_the_same_detector(tmp_path):
    experiment.main([
        "--work_dir", str(tmp_path), "--pretrain_steps", "2", "--max_steps", "2", "--labeled_images", "8",
        "--rows", "random/scratch,pretrained/full", "--threads", "1", "--json", str(tmp_path / "results.json"),
        "--data_args", "--synthetic_train_size 16", "--pretrain_args", "--train_batch_size 4 --num_samples 1 "
        "--sample_inference_steps 2 --checkpointing_steps 2",
        "--detection_args", "--synthetic_eval_size 4 --per_device_train_batch_size 4 --per_device_eval_batch_size 4"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pretraining"]["steps"] == 2
    assert [(r["row"], r["seed"]) for r in results["rows"]] == [
        ("random/scratch", 42), ("random/scratch", 1), ("pretrained/full", 42), ("pretrained/full", 1)]
    for record in results["rows"]:
        assert record["steps"] == 2 and 0 <= record["test_map"] <= 1 and record["cpu_seconds"] > 0
    configs = {name: json.loads((tmp_path / "rows" / f"{name}_seed42" / "config.json").read_text())
               for name in ("random_scratch", "pretrained_full")}
    assert architecture(configs["random_scratch"]) == architecture(configs["pretrained_full"])

    # A second call reuses every finished run instead of training again.
    before = {p: p.stat().st_mtime for p in tmp_path.glob("rows/*/experiment_row.json")}
    experiment.main(["--work_dir", str(tmp_path), "--pretrain_steps", "2", "--max_steps", "2", "--labeled_images",
                     "8", "--rows", "random/scratch,pretrained/full", "--threads", "1",
                     "--data_args", "--synthetic_train_size 16", "--pretrain_args", "--train_batch_size 4 "
                     "--num_samples 1 --sample_inference_steps 2 --checkpointing_steps 2", "--detection_args",
                     "--synthetic_eval_size 4 --per_device_train_batch_size 4 --per_device_eval_batch_size 4"])
    assert {p: p.stat().st_mtime for p in tmp_path.glob("rows/*/experiment_row.json")} == before
