"""benchmarks/throughput.py: what it counts and the models it compares, so the benchmark cannot silently break.
Behaviour only; no timings are asserted."""

import math

import pytest
import torch
from helpers import load_benchmark, tiny_config

from modeling_dit_detection import DiTBackbone, DiTForObjectDetection
from modeling_dit_detection.training.stages import set_trainable

throughput = load_benchmark("throughput")


def test_flop_counts_of_a_tiny_detector():
    model = DiTForObjectDetection(tiny_config())
    pixels = torch.rand(2, 3, *model.config.image_size) * 2 - 1
    labels = throughput.random_labels(2, model.config.num_labels, torch.Generator().manual_seed(0))
    forward = throughput.forward_flops(model, pixels[:1])
    train = throughput.train_flops(model, pixels, labels)
    assert forward > 0
    assert train > 2 * forward  # the backward is counted; training runs all query groups
    set_trainable(model, train_backbone=False)
    assert forward < throughput.train_flops(model, pixels, labels) < train  # no backward through a frozen backbone


@pytest.fixture(scope="module")
def small_rows():
    """The "small" geometry's rows, built and counted as the benchmark does."""
    rows, skipped = throughput.build_rows(throughput.row_specs(["small"]), torch.device("cpu"))
    assert skipped == []
    return rows


def test_peers_are_matched_to_ours(small_rows):
    config = throughput.our_config("small")
    backbone = config.backbone_config
    vit = throughput.lwdetr_config(config).backbone_config
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.patch_size, vit.out_indices) == (
        backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads, backbone.patch_size,
        backbone.out_indices)
    detr = throughput.detr_config(config, throughput.DETR_ENCODER_LAYERS["small"])
    assert detr.backbone_config.out_indices == [max(backbone.out_indices)]
    assert (detr.d_model, detr.num_queries, detr.decoder_layers) == (config.d_model, config.num_queries,
                                                                      config.decoder_layers)
    by_name = {row.spec.name: row for row in small_rows}
    assert isinstance(by_name["DETR + DiT small"].model.model.backbone.model, DiTBackbone)
    ours = by_name["ours small, full"].counts
    for row in small_rows:
        assert 0.85 < row.counts["forward_flops_per_image"] / ours["forward_flops_per_image"] < 1.15, row.spec.name


def test_folded_row_is_ours_with_the_same_outputs(small_rows):
    """The inference row with the conditioning folded times the same detector: same weights, same predictions."""
    by_name = {row.spec.name: row.model.eval() for row in small_rows}
    folded, full = by_name["ours small, conditioning folded"], by_name["ours small, full"]
    assert folded.config.backbone_config.fold_conditioning and not full.config.backbone_config.fold_conditioning
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(folded(pixel_values=pixels).logits, full(pixel_values=pixels).logits)


def test_flop_count_includes_attention_on_cpu():
    """FlopCounterMode counts the GPU attention kernels but not the CPU one; the benchmark's counter counts its
    forward as the two matmuls it replaces, and its backward with the GPU kernels' formula."""
    query, key, value = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    with throughput.flop_counter() as fused:
        torch.nn.functional.scaled_dot_product_attention(query, key, value)
    with throughput.flop_counter() as explicit:
        (query @ key.transpose(-1, -2) / 8**0.5).softmax(-1) @ value
    assert fused.get_total_flops() == explicit.get_total_flops() == 2 * (2 * 2 * 3 * 16 * 16 * 8)
    with throughput.flop_counter() as training:
        torch.nn.functional.scaled_dot_product_attention(query, key, value).sum().backward()
    assert training.get_total_flops() > 2 * fused.get_total_flops()


def test_frozen_row_trains_only_the_head(small_rows):
    frozen = next(row for row in small_rows if row.spec.name == "ours small, frozen backbone")
    backbone = frozen.model.model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    assert frozen.counts["trainable_parameters"] == frozen.counts["parameters"] - sum(
        p.numel() for p in backbone.parameters())


def test_every_row_trains_a_step_and_infers(small_rows):
    pixels, labels = throughput.make_batch("small", 2, torch.device("cpu"))
    for row in small_rows:
        before = [p.detach().clone() for p in row.model.parameters() if p.requires_grad]
        loss = throughput.train_step(row.model, row.optimizer, pixels, labels)
        assert math.isfinite(loss.item()), row.spec.name
        after = [p for p in row.model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), row.spec.name
        assert throughput.infer(row.model, pixels[:1]).logits.shape[0] == 1


def test_table_reports_ratios_to_ours(small_rows):
    for index, row in enumerate(small_rows):
        row.times = {"train": [0.5, 0.4 * (index + 1)], "infer_b1": [0.01], "infer_b8": [0.1, 0.05 * (index + 1)]}
    results = [throughput.summarize(row, peak=1e12) for row in small_rows]
    lines = throughput.table(results).splitlines()
    assert len(lines) == 2 + len(small_rows)
    ours = next(line for line in lines if line.startswith("| ours small, full"))
    assert "(1.00)" in ours and ours.count("| 1.00 |") == 2
    # ratios pair the rounds: the second row's times over ours' are 1.0 and 2.0 in its two rounds
    second = next(line for line in lines if line.startswith(f"| {small_rows[1].spec.name} |"))
    assert second.count("| 1.50 (1.00-2.00) |") == 2
    assert all(0 < r["mfu_train"] < 1 and 0 < r["mfu_infer_b8"] < 1 for r in results)


def test_frozen_cache_benchmark_runs_both_modes_and_tabulates(capsys):
    frozen_cache = load_benchmark("frozen_cache")
    result = frozen_cache.main(["--geometry", "tiny-latent", "--images", "6", "--batch-size", "4", "--epochs", "3",
                                "--repeats", "1", "--device", "cpu"])
    cached = result["runs"]["cached"][0]
    assert cached["counts"][0] == (0, 6)  # epoch 1 misses every image
    assert cached["counts"] == [(0, 6), (0, 6), (6, 0)]  # epoch 2 mirrors every image the other way; 3 hits all
    assert cached["entries"] == 12  # two inputs per image
    assert result["runs"]["plain"][0]["counts"] == [None] * 3
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + 3 + 1 and "speed-up" in table[0] and table[-1].startswith("| all 3 | ")
    assert table[-1].endswith("| 6 / 12 |")
    assert any("KiB per input" in line for line in lines)


xl_memory = load_benchmark("xl_memory")


def test_largest_batch_from_two_measured_peaks():
    rows = [{"variant": "stage2", "batch": 1, "peak_gib": 12.0}, {"variant": "stage2", "batch": 2, "peak_gib": 14.5},
            {"variant": "stage1", "batch": 1, "peak_gib": 5.0}]  # one batch size: no slope, no estimate
    fits = xl_memory.largest_batches(rows, gpu_gib=80)
    assert set(fits) == {"stage2"}
    assert fits["stage2"]["per_image_gib"] == pytest.approx(2.5)
    assert fits["stage2"]["fixed_gib"] == pytest.approx(9.5)
    assert fits["stage2"]["largest_batch"] == 28  # (80 - 9.5) / 2.5 = 28.2
    assert fits["stage2"]["largest_batch_4x_tokens"] == 7  # (80 - 9.5) / 10


def test_a_measured_step_trains_what_the_variant_says():
    full = xl_memory.measure(xl_memory.Variant(2, False, False, False), 2, 32, "cpu", preset="tiny-latent")
    folded = xl_memory.measure(xl_memory.Variant(2, True, True, True), 2, 32, "cpu", preset="tiny-latent")
    frozen = xl_memory.measure(xl_memory.Variant(1, False, False, False), 2, 32, "cpu", preset="tiny-latent")
    assert folded["parameters"] < full["parameters"]  # the adaLN MLPs and embedders are gone
    assert frozen["trainable_parameters"] < full["trainable_parameters"]
    assert full["trainable_parameters"] < full["parameters"]  # the VAE never trains
    assert all(row["peak_gib"] > 0 and row["step_seconds"] > 0 for row in (full, folded, frozen))


def test_criterion_stacking_benchmark_times_both_modes(capsys):
    criterion_stacking = load_benchmark("criterion_stacking")
    times = criterion_stacking.main(["--batch-size", "2", "--repeats", "2", "--calls", "1"])
    assert set(times) == {"per set", "stacked"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[-1].endswith("| 1.00 |")


def test_neck_layout_benchmark_times_both_layouts_of_both_necks(capsys):
    neck_layout = load_benchmark("neck_layout")
    config = throughput.our_config("small")
    taps = neck_layout.taps_like_the_backbone(config, 2)
    assert [tuple(tap.shape) for tap in taps] == [(2, 64, 16, 16)] * 2
    assert all(tap.is_contiguous(memory_format=torch.channels_last) for tap in taps)  # as the backbone's views
    times = neck_layout.main(["--geometries", "small", "--batch-size", "2", "--repeats", "2", "--calls", "1"])
    assert set(times) == {"small c2f", "small simple"}
    assert all(set(t) == {"channels-last", "channels-first"} and all(len(v) == 2 and min(v) > 0 for v in t.values())
               for t in times.values())
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert len(table) == 2


quality_per_compute = load_benchmark("quality_per_compute")


def test_quality_per_compute_models_are_matched():
    id2label = {i: str(i) for i in range(5)}
    ours, config = quality_per_compute.build_model("ours", id2label, list(range(5)))
    lwdetr, _ = quality_per_compute.build_model("lwdetr", id2label, list(range(5)))
    assert config.image_size == [256, 256] and config.num_queries == quality_per_compute.NUM_QUERIES
    assert lwdetr.config.num_queries == config.num_queries and lwdetr.config.group_detr == config.num_query_groups
    assert lwdetr.config.backbone_config.patch_size == config.backbone_config.patch_size == 8
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert 0.8 < count(lwdetr) / count(ours) < 1.25
    with pytest.raises(ValueError, match="unknown model"):
        quality_per_compute.build_model("yolo", id2label, list(range(5)))
    _, variant = quality_per_compute.build_model("ours", id2label, list(range(5)), {"neck_blocks": 1})
    assert variant.neck_blocks == 1 and variant.num_queries == config.num_queries


def test_quality_per_compute_detr_is_flop_matched_and_scored_by_its_softmax():
    id2label = {i: str(i) for i in range(5)}
    ours, config = quality_per_compute.build_model("ours", id2label, list(range(5)))
    detr, _ = quality_per_compute.build_model("detr", id2label, list(range(5)))
    assert detr.config.num_queries == config.num_queries and detr.config.encoder_layers == 2
    pixels = torch.rand(1, 3, 256, 256) * 2 - 1
    ratio = throughput.forward_flops(detr.eval(), pixels) / throughput.forward_flops(ours.eval(), pixels)
    assert 0.9 < ratio < 1.0
    logits = torch.randn(2, 7, 6) * 5
    probabilities = logits.softmax(-1)[..., :-1]
    torch.testing.assert_close(quality_per_compute.sigmoid_logits_of_softmax(logits).sigmoid(), probabilities)


def test_quality_per_compute_ablations_swap_one_part_for_lwdetrs():
    from transformers import LwDetrViTBackbone

    from modeling_dit_detection import DiTForObjectDetection

    id2label = {i: str(i) for i in range(5)}
    ours, _ = quality_per_compute.build_model("ours", id2label, list(range(5)))
    with_vit, _ = quality_per_compute.build_model("ours+lwdetr-vit", id2label, list(range(5)))
    with_projector, _ = quality_per_compute.build_model("ours+lwdetr-projector", id2label, list(range(5)))
    assert isinstance(with_vit.model.backbone, LwDetrViTBackbone)
    assert type(with_projector.model.neck).__name__ == "LwDetrMultiScaleProjector"
    assert type(with_vit.model.neck) is type(ours.model.neck) and type(with_projector.model.backbone) is type(
        ours.model.backbone)
    pixels = torch.rand(2, 3, 256, 256) * 2 - 1
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}] * 2
    for model in (with_vit, with_projector):
        assert isinstance(model, DiTForObjectDetection)
        outputs = model(pixel_values=pixels, labels=labels)
        assert outputs.pred_boxes.shape == (2, quality_per_compute.NUM_QUERIES, 4) and torch.isfinite(outputs.loss)


@pytest.mark.parametrize("option, value", [("--ours_config", "[1]"), ("--ours_config", "{not json"),
                                           ("--seconds_per_step", '{"ours": 0}'),
                                           ("--seconds_per_step", '{"ours": "fast"}')])
def test_quality_per_compute_rejects_bad_json_options(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        quality_per_compute.main(["--work_dir", str(tmp_path), option, value])
    assert option in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.slow  # about a minute: four child processes train both models a few steps and score them
def test_quality_per_compute_end_to_end(tmp_path, capsys):
    argv = ["--work_dir", str(tmp_path), "--unit_cpu_minutes", "0.05", "--budgets", "1,2", "--train_images", "8",
            "--eval_images", "4", "--jobs", "2", "--json", str(tmp_path / "results.json"),
            "--seconds_per_step", '{"lwdetr": 1.5}']
    results = quality_per_compute.main(argv)
    assert sorted((r["model"], r["budget"]) for r in results) == [("lwdetr", 1), ("lwdetr", 2), ("ours", 1), ("ours", 2)]
    for result in results:
        assert result["steps"] >= 1 and result["train_cpu_seconds"] > 0 and 0 <= result["test_map"] <= 1
        # LW-DETR's steps are fixed (3 s of budget per 1x / 1.5 s), ours calibrated
        assert result["calibrated"] == (result["model"] == "ours")
        if result["model"] == "lwdetr":
            assert result["steps"] == 2 * result["budget"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4
    again = quality_per_compute.main(argv)  # finished runs are reused, not retrained
    assert [r["train_cpu_seconds"] for r in again] == [r["train_cpu_seconds"] for r in results]


@pytest.mark.slow  # about half a minute: DETR trains a few steps in a child process and is scored
def test_quality_per_compute_trains_and_scores_detr(tmp_path):
    results = quality_per_compute.main(["--work_dir", str(tmp_path), "--unit_cpu_minutes", "0.05", "--budgets", "1",
                                        "--models", "detr", "--train_images", "8", "--eval_images", "4",
                                        "--seconds_per_step", '{"detr": 1.5}'])
    assert [(r["model"], r["steps"]) for r in results] == [("detr", 2)]
    assert results[0]["train_cpu_seconds"] > 0 and 0 <= results[0]["test_map"] <= 1


def test_mixed_precision_benchmark_compares_both_precisions_from_the_same_weights(capsys):
    mixed_precision = load_benchmark("mixed_precision")
    (result,) = mixed_precision.main(["--geometries", "small", "--repeats", "2", "--steps", "1", "--device", "cpu"])
    assert set(result["times"]) == {"train float32", "train bfloat16", "infer_b8 float32", "infer_b8 bfloat16"}
    losses = result["first_loss"]
    assert math.isfinite(losses["bfloat16"]) and losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    assert 0 <= result["max_score_difference"] < 0.05
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "bfloat16 speed-up" in table[0]


def test_dit_block_ops_benchmark_times_both_variants_and_restores_the_blocks_ops(capsys):
    from modeling_dit_detection import modeling_dit_backbone

    dit_block_ops = load_benchmark("dit_block_ops")
    ops = modeling_dit_backbone.gelu_tanh, modeling_dit_backbone.modulated_layer_norm
    with dit_block_ops.torch_ops(True):
        assert modeling_dit_backbone.gelu_tanh is dit_block_ops.torch_gelu_tanh
    assert (modeling_dit_backbone.gelu_tanh, modeling_dit_backbone.modulated_layer_norm) == ops
    times = dit_block_ops.main(["--geometries", "small", "--batch-size", "2", "--repeats", "2", "--calls", "1"])
    assert set(times) == {"small GELU alone", "small modulated norm alone", "small detector inference b2",
                          "small detector train step b2"}
    assert all(set(t) == {"block ops", "torch ops"} and all(len(v) == 2 and min(v) > 0 for v in t.values())
               for t in times.values())
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]) == 4
