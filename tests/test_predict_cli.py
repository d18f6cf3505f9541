"""The command lines around a trained detector: `python -m modeling_dit_detection.hub` (the folder is checked before
the Hub is contacted)."""

import pytest
import torch
from helpers import tiny_config

import modeling_dit_detection.hub as hub
from modeling_dit_detection import DiTDetectionImageProcessor, DiTForObjectDetection
from modeling_dit_detection.hub import push_folder_to_hub

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
