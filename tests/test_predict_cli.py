"""The command lines around a trained detector: `python -m modeling_dit_detection.predict` (inputs never overwritten,
earlier outputs only with --overwrite, bad files skipped and named, argument errors, the dataset's category ids, no
training stack) and `python -m modeling_dit_detection.hub` (the folder is checked before the Hub is contacted)."""

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from helpers import tiny_config, worker_env

import modeling_dit_detection.hub as hub
from modeling_dit_detection import DiTDetectionImageProcessor, DiTForObjectDetection
from modeling_dit_detection.hub import push_folder_to_hub
from modeling_dit_detection.predict import PredictError, cli, detect, load_model, predict
from modeling_dit_detection.predict import main as predict_main

CLASSES = ["circle", "square", "triangle", "cross", "ring"]


def _save_detector(folder, id2label, **config_extras):
    torch.manual_seed(0)
    config = tiny_config(id2label=id2label)
    model = DiTForObjectDetection(config)
    for key, value in config_extras.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    DiTDetectionImageProcessor(size=dict(zip(("height", "width"), config.image_size)),
                               size_divisor=config.backbone_stride).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny detector of 5 classes (model + processor), as run_detection.py leaves one."""
    return _save_detector(tmp_path_factory.mktemp("detector"), dict(enumerate(CLASSES)))


def _image(path, size=(90, 70)):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    PIL.Image.fromarray(pixels.numpy()).save(path)
    return path


def _photos(tmp_path, *names):
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for name in names:
        _image(photos / name)
    return photos


def _tree(folder) -> dict:
    """Every file under `folder` with its bytes: what a refused run must leave as it was."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _predict(folder, *args):
    return predict_main(["--model", str(folder), *map(str, args)])


# ------------------------------------------------------------------------------------------------- what it writes


def test_the_loaded_detector_is_folded_and_detects_as_the_saved_one(folder, tmp_path):
    model, processor = load_model(str(folder), device="cpu")
    assert model.config.backbone_config.fold_conditioning and not model.training
    assert not any("adaln_modulation" in name for name, _ in model.named_parameters())
    saved = DiTForObjectDetection.from_pretrained(folder).eval()
    assert not saved.config.backbone_config.fold_conditioning
    image = PIL.Image.open(_image(tmp_path / "photo.png")).convert("RGB")
    folded, unfolded = detect(model, processor, [image], 0.0)[0], detect(saved, processor, [image], 0.0)[0]
    assert len(folded["scores"]) > 0
    for key in ("scores", "labels", "boxes"):
        torch.testing.assert_close(folded[key], unfolded[key])


def test_predict_cli_writes_one_png_and_one_json_entry_per_image(folder, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    _image(images / "a.png", (80, 60))
    _image(images / "b.jpg", (50, 90))
    _image(images / "more" / "a.png", (64, 64))  # same name in another folder
    (images / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    predict_main(["--model", str(folder), str(images), "--output-dir", str(output), "--threshold", "0.0",
                  "--batch-size", "2"])
    assert "detections in 3 images" in capsys.readouterr().out
    assert sorted(p.name for p in output.glob("*.png")) == ["a-1.png", "a.png", "b.png"]
    coco = json.loads((output / "predictions.json").read_text())
    assert len(coco["images"]) == 3 and {image["annotated"] for image in coco["images"]} == {"a.png", "a-1.png",
                                                                                             "b.png"}
    assert [c["name"] for c in coco["categories"]] == ["circle", "square", "triangle", "cross", "ring"]
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    assert coco["annotations"] and {a["image_id"] for a in coco["annotations"]} == set(sizes)
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        assert 0 <= x <= x + w <= width + 1e-3 and 0 <= y <= y + h <= height + 1e-3 and 0 <= annotation["score"] <= 1
    for image in coco["images"]:
        assert PIL.Image.open(output / image["annotated"]).size == (image["width"], image["height"])


def test_inputs_whose_names_differ_only_in_case_or_suffix_get_distinct_outputs(folder, tmp_path):
    photos = _photos(tmp_path, "a.png", "a.jpg", "A.bmp")
    coco = _predict(folder, photos, "--output-dir", tmp_path / "out")
    names = [image["annotated"] for image in coco["images"]]  # inputs in sorted order: A.bmp, a.jpg, a.png
    assert names == ["A.png", "a-1.png", "a-2.png"]
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_predict_takes_one_path_as_well_as_a_list(folder, tmp_path):
    photos = _photos(tmp_path, "x.png")
    coco = predict(str(folder), photos / "x.png", tmp_path / "out")
    assert [image["annotated"] for image in coco["images"]] == ["x.png"]


def test_predict_cli_rejects_a_missing_input(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        predict_main(["--model", str(folder), str(tmp_path / "nope.png")])


# ------------------------------------------------------------------------------- never overwrite inputs or outputs


def test_an_input_folder_as_output_folder_is_refused_and_changes_nothing(folder, tmp_path):
    photos = _photos(tmp_path, "x.png", "y.jpg")
    before = _tree(photos)
    os.symlink(photos, tmp_path / "link")
    for output in (photos, tmp_path / "link", tmp_path / "photos" / "."):
        with pytest.raises(PredictError, match=r"is the input folder .*photos.*Choose another --output-dir"):
            _predict(folder, photos, "--output-dir", output, "--overwrite")
    for output in (photos / "x.png", photos / "x.png" / "out"):
        with pytest.raises(PredictError, match=r"photos/x.png is a file; give a folder"):
            _predict(folder, photos, "--output-dir", output)
    assert _tree(photos) == before


def test_an_output_that_would_replace_an_input_is_refused_even_with_overwrite(folder, tmp_path):
    photos = _photos(tmp_path, "x.png")
    before = _tree(photos)
    with pytest.raises(PredictError, match=r"photos/x.png would replace the input .*photos/x.png.*never overwritten"):
        _predict(folder, photos / "x.png", "--output-dir", photos, "--overwrite")
    # An output path that is a link to an input, from an earlier run or a user, is not written through either.
    output = tmp_path / "out"
    output.mkdir()
    os.symlink(photos / "x.png", output / "x.png")
    with pytest.raises(PredictError, match=r"out/x.png would replace the input"):
        _predict(folder, photos, "--output-dir", output, "--overwrite")
    assert _tree(photos) == before and sorted(os.listdir(output)) == ["x.png"]


def test_earlier_outputs_are_replaced_only_with_overwrite(folder, tmp_path):
    photos = _photos(tmp_path, "x.png")
    output = tmp_path / "out"
    _predict(folder, photos, "--output-dir", output)
    before = _tree(output)
    with pytest.raises(PredictError, match=r"2 output files of an earlier run exist in .*out \(.*out/x.png, .*"
                                           r"out/predictions.json\)\. Pass --overwrite to replace them"):
        _predict(folder, photos, "--output-dir", output, "--threshold", "0.9")
    assert _tree(output) == before
    coco = _predict(folder, photos, "--output-dir", output, "--threshold", "0.9", "--overwrite")
    assert coco["info"]["threshold"] == 0.9 and json.loads((output / "predictions.json").read_text()) == coco
    umask = os.umask(0o22)
    os.umask(umask)
    assert {stat.S_IMODE(os.stat(output / name).st_mode) for name in ("x.png", "predictions.json")} == {0o666 & ~umask}
    assert sorted(os.listdir(output)) == ["predictions.json", "x.png"]  # no temporary files left behind


def test_overwrite_never_replaces_files_this_tool_did_not_write(folder, tmp_path):
    photos = _photos(tmp_path, "x.jpg")
    output = tmp_path / "out"
    output.mkdir()
    _image(output / "x.png")  # the user's own picture, where x.jpg's annotated copy would go
    (output / "predictions.json").write_text('{"mine": true}')
    before = _tree(output)
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(PredictError, match=r"out/x.png, .*out/predictions.json in .* are in the way and not "
                                               r"written by modeling_dit_detection.predict, so not even --overwrite"):
            _predict(folder, photos, "--output-dir", output, *overwrite)
    assert _tree(output) == before


def test_an_output_folder_inside_an_input_folder_is_not_read_back_on_a_rerun(folder, tmp_path, caplog):
    photos = _photos(tmp_path, "x.png")
    _predict(folder, photos, "--output-dir", photos / "predictions")
    with caplog.at_level(logging.INFO, logger="modeling_dit_detection.predict"):
        again = _predict(folder, photos, "--output-dir", photos / "predictions", "--overwrite")
        # Another output folder: the first run's annotated PNG is recognised as an output, not taken as a photo.
        elsewhere = _predict(folder, photos, "--output-dir", photos / "more" / "predictions")
    for coco in (again, elsewhere):
        assert [image["file_name"] for image in coco["images"]] == [str(photos / "x.png")]
    assert "it is the output folder" in caplog.text and "Left out 1 annotated images of earlier runs" in caplog.text


# ------------------------------------------------------------------------------------------------------ bad files


def test_unreadable_files_are_skipped_named_and_counted_and_the_rest_is_written(folder, tmp_path, monkeypatch,
                                                                                 caplog, capsys):
    photos = _photos(tmp_path)
    _image(photos / "good.png", (40, 30))
    (photos / "text.jpg").write_text("not a JPEG")
    jpeg = _image(photos / "full.jpg", (40, 30)).read_bytes()
    (photos / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (photos / "full.jpg").unlink()
    _image(photos / "bomb.png", (100, 100))
    _image(photos / "large.png", (50, 50))
    os.symlink(tmp_path / "gone.png", photos / "dangling.png")
    os.mkfifo(photos / "pipe.jpg")  # opening it would block: it is skipped as not a regular file
    os.mkfifo(photos / "pipe.png")  # the same, though a .png is first checked for being an earlier run's output
    # PIL refuses images over 2x MAX_IMAGE_PIXELS and warns over 1x: 100 x 100 is refused, 50 x 50 warned about.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        coco = _predict(folder, photos, "--output-dir", output, "--batch-size", "2")
    bad = ["bomb.png", "dangling.png", "pipe.jpg", "pipe.png", "text.jpg", "truncated.jpg"]
    assert sorted(image["annotated"] for image in coco["images"]) == ["good.png", "large.png"]
    assert sorted(os.path.basename(entry["file_name"]) for entry in coco["info"]["skipped"]) == bad
    assert json.loads((output / "predictions.json").read_text()) == coco
    assert sorted(p.name for p in output.iterdir()) == ["good.png", "large.png", "predictions.json"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for name in bad:
        assert any(f"Skipping {photos / name}: it cannot be read as an image" in message for message in warnings)
    assert any(str(photos / "large.png") in message and "decompression bomb" in message for message in warnings)
    summary = capsys.readouterr().out
    assert "detections in 2 images" in summary and "skipped 6 files that could not be read" in summary
    assert all(str(photos / name) in summary for name in bad)


def test_a_run_in_which_no_image_can_be_read_fails_and_writes_nothing(folder, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_text("text")
    (photos / "b.png").write_bytes(b"")
    output = tmp_path / "out"
    with pytest.raises(PredictError, match=r"None of the 2 image files could be read \(.*a.jpg, .*b.png"):
        _predict(folder, photos, "--output-dir", output)
    assert not output.exists()
    assert cli(["--model", str(folder), str(photos), "--output-dir", str(output)]) == 1
    assert "error: None of the 2 image files could be read" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--batch-size", "-2"), ("--batch-size", "2.5"),
                                             ("--threshold", "nan"), ("--threshold", "1.5"), ("--threshold", "-0.1"),
                                             ("--threshold", "inf"), ("--device", "gpu")])
def test_bad_numbers_are_argument_errors_naming_the_flag(folder, tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _predict(folder, _photos(tmp_path, "x.png"), "--output-dir", tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_missing_or_incomplete_model_folder_is_the_first_error(folder, tmp_path):
    incomplete = {name: tmp_path / name for name in ("empty", "config-only", "no-processor")}
    for path in incomplete.values():
        path.mkdir()
    (incomplete["config-only"] / "config.json").write_bytes((folder / "config.json").read_bytes())
    for name in ("config.json", "model.safetensors"):
        (incomplete["no-processor"] / name).write_bytes((folder / name).read_bytes())
    cases = {tmp_path / "missing": "no such folder", incomplete["empty"]: "it has no config.json",
             incomplete["config-only"]: "it has no weights", incomplete["no-processor"]: "no preprocessor_config.json"}
    for model, message in cases.items():
        with pytest.raises(PredictError, match=f"--model.*{model}.*{message}"):
            # The inputs are missing too: the model is checked first.
            predict_main(["--model", str(model), str(tmp_path / "nope.png"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_truncated_weights_file_is_a_predict_error_naming_the_model(folder, tmp_path):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for source in folder.iterdir():
        (truncated / source.name).write_bytes(source.read_bytes())
    (truncated / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(PredictError, match=f"Could not load the weights of --model {truncated}: .*truncated or corrupt"):
        _predict(truncated, _photos(tmp_path, "x.png"), "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------- COCO


def test_coco_output_carries_the_dataset_category_ids(tmp_path):
    from pycocotools.coco import COCO

    id2label = {0: "person", 1: "car", 2: "toothbrush"}
    plain = _save_detector(tmp_path / "plain", id2label)
    coco_ids = _save_detector(tmp_path / "coco-ids", id2label, category_ids=[1, 7, 90])  # the same weights
    photos = _photos(tmp_path, "x.png", "y.jpg")
    by_label = _predict(plain, photos, "--output-dir", tmp_path / "by-label", "--threshold", "0")
    result = _predict(coco_ids, photos, "--output-dir", tmp_path / "out", "--threshold", "0")
    assert result["categories"] == [{"id": 1, "name": "person"}, {"id": 7, "name": "car"},
                                    {"id": 90, "name": "toothbrush"}]
    assert [a["category_id"] for a in result["annotations"]] == [
        [1, 7, 90][a["category_id"]] for a in by_label["annotations"]]  # label i -> category_ids[i], in order
    assert {a["category_id"] for a in result["annotations"]} <= {1, 7, 90}
    ground_truth = COCO(str(tmp_path / "out" / "predictions.json"))
    detections = ground_truth.loadRes(result["annotations"])
    assert len(detections.getAnnIds()) == len(result["annotations"]) > 0
    assert set(detections.getCatIds()) == {1, 7, 90}


def test_category_ids_that_do_not_fit_the_labels_are_an_error(tmp_path):
    model = _save_detector(tmp_path / "model", {0: "a", 1: "b", 2: "c"}, category_ids=[1, 7])
    # The config refuses them when it loads, or predict does (for a config class that does not check them).
    with pytest.raises(PredictError, match=r"category_ids.*\[1, 7\]"):
        _predict(model, _photos(tmp_path, "x.png"), "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- no training stack needed

# Runs the predict CLI as `python -m` would, in an interpreter where the training stack cannot be imported.
WITHOUT_TRAINING_STACK = textwrap.dedent("""
    import importlib.abc, runpy, sys

    BLOCKED = {"datasets", "evaluate", "pycocotools"}

    class BlockTrainingStack(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"{name} imported: inference must not need the training stack")
            return None

    sys.meta_path.insert(0, BlockTrainingStack())
    sys.argv = ["predict", *sys.argv[1:]]
    try:
        runpy.run_module("modeling_dit_detection.predict", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code:
            raise
    print("loaded:", sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED
                            or name.startswith("modeling_dit_detection.training")))
""")


@pytest.mark.slow  # long: a subprocess or a whole run (the default suite stays short)
def test_predict_runs_where_datasets_evaluate_and_pycocotools_cannot_be_imported(folder, tmp_path):
    photos = _photos(tmp_path, "x.png")
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRAINING_STACK, "--model", str(folder), str(photos),
                             "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, env=worker_env(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "detections in 1 images" in result.stdout and "loaded: []" in result.stdout
    assert (tmp_path / "out" / "predictions.json").is_file()


# ------------------------------------------------------------------------------------------------------- hub CLI


class RecordingApi:
    """HfApi stand-in: records the methods called, contacts nothing."""

    def __init__(self, **kwargs):
        self.calls = []
        RecordingApi.last = self

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return f"https://huggingface.co/{name}"
        return call


def _hub_main(monkeypatch, *argv) -> int:
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.last = None
    with pytest.raises(SystemExit) as exit_info:
        hub.main([str(arg) for arg in argv])
    return exit_info.value.code


def test_hub_cli_checks_the_folder_before_contacting_the_hub(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_bytes((folder / "config.json").read_bytes())
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    (tmp_path / "bad-config" / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cases = {"missing": "does not exist", "file.txt": "is a file, not a model folder",
             "empty": "it has no config.json", "no-weights": "it has no weights",
             "bad-config": "config.json is not a model config"}
    for name, message in cases.items():
        assert _hub_main(monkeypatch, tmp_path / name, "someone/dit-detector") == 2
        error = capsys.readouterr().err
        assert str(tmp_path / name) in error and message in error and "Nothing was sent to the Hub" in error
        assert RecordingApi.last is None  # no client was even made
    assert _hub_main(monkeypatch, folder, "not a repo id!") == 2
    assert "is not a Hub repo id" in capsys.readouterr().err and RecordingApi.last is None
    assert _hub_main(monkeypatch, folder, "someone/dit-detector") == 0  # the stand-in works: a good folder is sent
    assert RecordingApi.last.calls == ["create_repo", "upload_folder"]


def test_pushing_a_folder_that_is_not_a_saved_model_raises_before_any_hub_call(tmp_path):
    api = RecordingApi()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_folder_to_hub(tmp_path / "missing", "someone/dit-detector", api=api)
    with pytest.raises(ValueError, match="no config.json"):
        push_folder_to_hub(tmp_path, "someone/dit-detector", api=api)
    assert api.calls == []
