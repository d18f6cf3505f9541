"""Where a detector to train comes from (`load_detector`) and the input size of a new one."""

import pytest
import torch
from helpers import tiny_config

from modeling_dit_detection import DiTForObjectDetection
from modeling_dit_detection.training.recipes import check_config_overrides, input_size_from_data, load_detector

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}


@pytest.fixture(scope="module")
def saved_detector(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    DiTForObjectDetection(tiny_config(id2label=ID2LABEL)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides", [{"hidden_size": 64}, {"num_hidden_layers": 2}, {"decoder_layers": 3},
                                       {"d_model": 64}, {"out_indices": [4]}, {"fold_conditioning": True},
                                       {"neck_blocks": 1}, {"neck": "c2f"}, {"box_update": "relative"},
                                       {"anchor_tokens": 4.0}, {"box_refinement": "lite"}])
def test_overrides_that_would_reinitialise_a_saved_detector_are_refused(saved_detector, overrides):
    with pytest.raises(ValueError, match="would re-initialise or invalidate its trained weights"):
        load_detector(str(saved_detector), ID2LABEL, overrides=overrides)


def test_a_saved_detector_keeps_its_weights_under_harmless_overrides_and_new_classes(saved_detector):
    original = DiTForObjectDetection.from_pretrained(saved_detector)
    loaded = load_detector(str(saved_detector), ID2LABEL, overrides={"image_size": [32, 96], "out_indices": [1, 3],
                                                                     "feature_timestep": 50, "class_loss": "focal"})
    assert loaded.pretrained_backbone and loaded.source_kind == "dit_detection"
    assert loaded.model.config.image_size == [32, 96] and loaded.model.config.backbone_config.out_indices == [1, 3]
    assert loaded.model.config.class_loss == "focal"  # a training-only field: the weights stay
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    # Other classes: new class heads (only those), the backbone and decoder as trained.
    other = load_detector(str(saved_detector), {0: "cat", 1: "dog"}).model
    assert other.config.num_labels == 2 and other.class_heads[0].out_features == 2
    torch.testing.assert_close(other.model.backbone.layers[0].mlp.fc1.weight,
                               original.model.backbone.layers[0].mlp.fc1.weight, rtol=0, atol=0)


def test_unknown_config_fields_are_refused():
    check_config_overrides({"decoder_layers": 2, "image_size": 64, "category_ids": [1, 2]})
    with pytest.raises(ValueError, match=r"Unknown config fields \['num_decoder_layers'\]"):
        check_config_overrides({"num_decoder_layers": 2})


def test_a_new_models_input_size_follows_the_data():
    assert input_size_from_data([(64, 64)] * 3, stride=4) == (64, 64)
    assert input_size_from_data([(480, 640), (480, 640), (600, 800)], stride=16) == (384, 512)  # capped at 512
    assert input_size_from_data([(3, 2)], stride=16) == (16, 16)  # at least one stride
    new = load_detector(None, ID2LABEL, preset="tiny", image_sizes=[(250, 130), (256, 128)])
    assert new.model.config.image_size == [252, 128] and not new.pretrained_backbone
    given = load_detector(None, ID2LABEL, preset="tiny", overrides={"image_size": 32}, image_sizes=[(256, 256)])
    assert given.model.config.image_size == [32, 32]
