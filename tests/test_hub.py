"""A training output is a complete Hub model repo: remote code in a clean process, the card, the push.

The predict and hub command lines are tested in test_predict_cli.py."""

import json
import logging
import re
import subprocess
import sys
import textwrap

import PIL.Image
import pytest
import torch
from helpers import ROOT, tiny_config, worker_env
from huggingface_hub import HfApi, ModelCard
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

from modeling_dit_detection.hub import files_to_upload, push_folder_to_hub

# Runs in a fresh interpreter in which `import modeling_dit_detection` fails, so only the folder's code can serve.
REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["modeling_dit_detection"] = None  # importing the installed package now raises ImportError
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForObjectDetection, pipeline

    folder, image_path = sys.argv[1], sys.argv[2]
    try:
        import modeling_dit_detection
        raise SystemExit("the installed package is importable")
    except ImportError:
        pass
    model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(image_path)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    result = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.size[::-1]])[0]
    detector = pipeline("object-detection", model=folder, trust_remote_code=True)
    print(json.dumps({
        "classes": [type(model).__module__ + "." + type(model).__name__, type(base).__name__,
                    type(processor).__module__ + "." + type(processor).__name__],
        "boxes": result["boxes"].tolist(), "scores": result["scores"].tolist(),
        "pipeline": detector(image, threshold=0.0),
    }))
""")


def _clean_env(tmp_path) -> dict:
    # Remote code is copied into HF_MODULES_CACHE; keep it inside the test's folder.
    return worker_env(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")


def _image(path, size=(90, 70)):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    PIL.Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.mark.slow  # long: a subprocess or a whole run (the default suite stays short)
def test_remote_code_in_a_clean_process_gives_the_installed_packages_boxes(small_job, tmp_path):
    folder, _, _ = small_job
    image_path = _image(tmp_path / "image.png")
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(image_path)],
                            capture_output=True, text=True, cwd=tmp_path, env=_clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    model_class, base_class, processor_class = remote["classes"]
    assert model_class.startswith("transformers_modules.") and model_class.endswith("DiTForObjectDetection")
    assert base_class == "DiTDetectionModel"
    assert processor_class.startswith("transformers_modules.") and processor_class.endswith("ImageProcessor")

    # With the child's one thread (worker_env): a score's last bits depend on the thread count (about 1e-8 between one
    # and two threads since the DiT block's sigmoid-form GELU and affine LayerNorm; equal bits at equal counts).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        installed = pipeline("object-detection", model=str(folder))(PIL.Image.open(image_path), threshold=0.0)
    finally:
        torch.set_num_threads(threads)
    assert remote["pipeline"] == installed
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    image = PIL.Image.open(image_path)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    expected = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(70, 90)])[0]
    torch.testing.assert_close(torch.tensor(remote["boxes"]), expected["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(remote["scores"]), expected["scores"], rtol=0, atol=1e-6)


def test_card_metadata_and_results(small_job):
    folder, metrics, _ = small_job
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "object-detection"
    assert data.license == "apache-2.0" and "object-detection" in data.tags
    # huggingface_hub parses `model-index` back into EvalResults: the metadata is well formed.
    results = {result.metric_type: result.metric_value for result in data.eval_results}
    assert results == {"map": round(metrics["test_map"], 4), "map_50": round(metrics["test_map_50"], 4),
                       "map_75": round(metrics["test_map_75"], 4)}
    assert all(result.dataset_split == "test" for result in data.eval_results)
    text = card.text
    for section in ("## Model", "## Intended uses and limits", "## How to use", "## Training", "## Evaluation",
                    "## Compute"):
        assert section in text
    assert f"| map_50 | {metrics['test_map_50']:.4f} |" in text
    assert "| circle |" in text  # per-class AP table
    assert "| learning_rate | 0.001 |" in text
    assert "corrections in logit space" in text and "sigmoid focal classification" in text
    assert "proposal anchors 0.05 x 2^level of the image wide" in text
    assert "{{" not in text and "}}" not in text


def test_card_usage_snippets_run_against_the_folder(small_job, tmp_path):
    folder, _, _ = small_job
    card = (folder / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(snippets) == 2
    _image(tmp_path / "image.jpg")
    repo_id = folder.name  # the card names the repo the folder would be pushed to
    script = "import sys\nsys.modules['modeling_dit_detection'] = None\n" + "\n".join(
        snippet.replace(f'"{repo_id}"', repr(str(folder))) for snippet in snippets) + \
        "\nprint(len(detections), len(results[0]['boxes']))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=_clean_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]


def test_upload_set_is_the_model_repo_without_training_state(small_job):
    folder, _, _ = small_job
    files = files_to_upload(folder)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json",
                 "predictions_preview.png", "modeling_dit_detection.py", "configuration_dit_detection.py",
                 "image_processing_dit_detection.py", "loss_dit_detection.py"):
        assert name in files
    assert any(re.match(r"stage[12]/runs/.*tfevents", name) for name in files)  # TensorBoard logs go along
    assert not any("checkpoint-" in name or name.startswith("stage1/final") or "optimizer" in name
                   for name in files)


def test_failed_push_keeps_the_output_and_logs_the_retry_command(small_job, caplog):
    folder, _, _ = small_job
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_not_a_token")  # nothing listens on port 9
    with caplog.at_level(logging.ERROR):
        assert push_folder_to_hub(folder, "someone/dit-detector", api=api) is None
    assert "retry with" in caplog.text and f"hf upload someone/dit-detector {folder}" in caplog.text
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


def test_card_metadata_names_only_hub_ids(tmp_path):
    from modeling_dit_detection.training.model_card import TrainingSummary, render_model_card

    template = ROOT / "model_cards" / "template.md"
    metrics = {"test_map": 0.5, "test_map_50": 0.7}
    local = render_model_card(tiny_config(), TrainingSummary(model_name="m", dataset_name=str(tmp_path), metrics=metrics,
                                                             base_model=str(tmp_path)), template)
    assert local.data.base_model is None and local.data.datasets is None
    assert str(tmp_path) in local.text  # the text still says where it came from
    hub = render_model_card(tiny_config(), TrainingSummary(model_name="m", dataset_name="rishitdagli/cppe-5",
                                                           metrics=metrics, base_model="facebook/DiT-XL-2-256"), template)
    assert hub.data.base_model == "facebook/DiT-XL-2-256" and hub.data.datasets == ["rishitdagli/cppe-5"]


def test_card_describes_the_box_update_and_anchors_of_its_config():
    from modeling_dit_detection.training.model_card import TrainingSummary, render_model_card

    summary = TrainingSummary(model_name="m", dataset_name="d", metrics={"test_map": 0.5})
    card = render_model_card(tiny_config(box_update="relative", anchor_tokens=3.2, class_loss="iou_aware",
                                         box_refinement="lite"), summary, ROOT / "model_cards" / "template.md")
    assert "proposal anchors 3.2 tokens of their level wide" in card.text
    assert "box refinement of the selected proposals at every layer" in card.text
    default_card = render_model_card(tiny_config(), summary, ROOT / "model_cards" / "template.md")
    assert "iterative box refinement" in default_card.text
    assert "corrections relative to each box's size" in card.text and "IoU-aware sigmoid classification" in card.text


def test_space_card_runs_the_demo_app():
    """The Space card's front matter (the README.md of a demo Space, see README "Demo") makes a Gradio Space whose app
    file is the repository's app.py."""
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(ROOT / "model_cards" / "space_README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert (ROOT / card.data.app_file).is_file()
