"""Try a trained detector in the browser: a Gradio app, which is also the app file of a Hugging Face Space.

    pip install ".[demo]"
    python app.py --model outputs/synthetic        # then open the printed URL (default http://127.0.0.1:7860)

Upload an image (or click an example), set the score threshold, and the page shows the detections drawn on the image
and listed (class, score, box x0, y0, x1, y1 in the image's pixels). Images are read and detected exactly as the
predict CLI reads and detects them (`modeling_dit_detection.predict.read_image` and `detect`), so the page shows what
`python -m modeling_dit_detection.predict` writes for the same threshold.

The model loads once, in a background thread: the server is up in seconds whatever the model's size, the page says
how long the load has taken so far, and a detection asked for before the model is there waits for it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import PIL.Image

from modeling_dit_detection.predict import PredictError, detect, load_model, read_image
from modeling_dit_detection.visualization import detection_grid

logger = logging.getLogger(__name__)

# What run_detection.py's built-in job writes (README, Quickstart); a Space names its model in the DEMO_MODEL variable.
DEFAULT_MODEL = "outputs/synthetic"
DEFAULT_THRESHOLD = 0.3  # the predict CLI's default
MIN_SHOWN_SIDE = 256  # smaller images are enlarged for display, so that the captions stay legible
COLUMNS = ["label", "score", "x0", "y0", "x1", "y1"]


class Detector:
    """A trained detector that loads once, in a background thread: the server does not wait for it, requests do."""

    def __init__(self, model_name_or_path: str, device: str | None = None, trust_remote_code: bool = False):
        self.name = model_name_or_path
        self.model = self.processor = self.error = None
        self._started, self._took = time.monotonic(), None
        self._done = threading.Event()
        threading.Thread(target=self._load, args=(device, trust_remote_code), daemon=True).start()

    def _load(self, device: str | None, trust_remote_code: bool) -> None:
        try:
            self.model, self.processor = load_model(self.name, device, trust_remote_code)
        except Exception as error:  # any failure is shown on the page; the server stays up to say so
            logger.exception("Could not load %s", self.name)
            self.error = str(error) if isinstance(error, PredictError) else f"{type(error).__name__}: {error}"
        self._took = time.monotonic() - self._started
        self._done.set()

    @property
    def loaded(self) -> bool:
        return self._done.is_set()

    def status(self) -> str:
        """One line of Markdown: loading (for how long), ready (with the classes), or why it failed."""
        if not self.loaded:
            return f"Loading the model `{self.name}` ... ({time.monotonic() - self._started:.0f} s so far)"
        if self.error:
            return f"**Could not load the model `{self.name}`:** {self.error}"
        labels = ", ".join(self.id2label.values())
        return f"Model `{self.name}` ready (loaded in {self._took:.1f} s; classes: {labels})."

    @property
    def id2label(self) -> dict[int, str]:
        return {int(label): name for label, name in self.model.config.id2label.items()}

    def wait(self):
        """(model, processor) once loaded; a gr.Error (shown on the page) if the load failed."""
        self._done.wait()
        if self.error:
            raise gr.Error(f"The model could not be loaded: {self.error}", print_exception=False)  # logged by _load
        return self.model, self.processor


def annotate(image: PIL.Image.Image, result: dict, id2label: dict[int, str]) -> PIL.Image.Image:
    """`image` with `result` (detect's dict for it) drawn; a small image is enlarged first, boxes with it."""
    scale = max(1, math.ceil(MIN_SHOWN_SIDE / min(image.size)))
    return detection_grid([image], [result], id2label, columns=1, tile_size=(image.height * scale, image.width * scale))


def table(result: dict, id2label: dict[int, str]) -> list[list]:
    """One row per detection, best first: label, score (3 decimals), box x0, y0, x1, y1 (pixels, 1 decimal)."""
    found = sorted(zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()),
                   key=lambda detection: -detection[0])  # by the score itself: rounded ones can tie
    return [[id2label.get(label, str(label)), round(score, 3), *(round(value, 1) for value in box)]
            for score, label, box in found]


def run(detector: Detector, path: str | None, threshold: float, progress=gr.Progress()):
    """The event handler: (annotated image, table rows) of the image file at `path`, or empty outputs for none."""
    if path is None:
        return None, []
    try:
        image = read_image(Path(path))
    except Exception as error:  # any decoding failure, as the CLI's skip-and-warn catches it
        name = Path(path).name  # the uploaded file's own name; the server's copy of it is no business of the page
        reason = str(error).replace(path, name)
        raise gr.Error(f"{name} cannot be read as an image ({type(error).__name__}: {reason}).",
                       print_exception=False) from None
    if not detector.loaded:
        progress(None, desc="Waiting for the model to load")
    model, processor = detector.wait()
    result = detect(model, processor, [image], threshold)[0]
    return annotate(image, result, detector.id2label), table(result, detector.id2label)


def write_examples(folder: Path, count: int = 3) -> list[Path]:
    """PNGs of the first `count` test images of run_detection.py's built-in data (seed 42, 64 x 64 pixels): what
    the default model was evaluated on. Rendered by the data's own generator, so nothing ships as binary files."""
    from modeling_dit_detection.training.synthetic_data import render_synthetic_example

    paths = []
    for index in range(count):
        pixels, _, _ = render_synthetic_example(seed=42, split="test", index=index, image_size=64)
        paths.append(folder / f"shapes-test-{index}.png")
        PIL.Image.fromarray(pixels).save(paths[-1])
    return paths


def build_demo(detector: Detector, examples: list[Path]) -> gr.Blocks:
    """The page: upload + examples + threshold on the left, the drawn detections and their table on the right."""
    with gr.Blocks(title="DiT object detection") as demo:
        gr.Markdown("# DiT object detection\nA DETR-style detector on a Diffusion Transformer backbone. Upload an "
                    "image or click an example; boxes are in the image's own pixels.")
        status = gr.Markdown(detector.status())
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Score threshold")
                gr.Examples([[str(path)] for path in examples], inputs=[upload], label="Examples (built-in test data)")
            with gr.Column():
                drawn = gr.Image(label="Detections", type="pil", format="png", interactive=False, elem_id="drawn")
                rows = gr.Dataframe(headers=COLUMNS, datatype=["str"] + ["number"] * 5, label="Detections",
                                    interactive=False, elem_id="detections")
        # A slider drag or typed threshold fires many changes; "always_last" runs only the newest one left waiting.
        gr.on([upload.change, threshold.change], functools.partial(run, detector),
              inputs=[upload, threshold], outputs=[drawn, rows], trigger_mode="always_last")
        # The status line follows the load until it is done, then stops polling.
        timer = gr.Timer(0.5)
        timer.tick(lambda: (detector.status(), gr.Timer(active=not detector.loaded)), outputs=[status, timer])
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DEMO_MODEL", DEFAULT_MODEL),
                        help=f"A trained detector: folder or Hub id (default: $DEMO_MODEL, else {DEFAULT_MODEL}).")
    parser.add_argument("--host", default=None, help="Address to serve on (default: Gradio's, 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: Gradio's, 7860 or the next free one).")
    parser.add_argument("--share", action="store_true", help="Also serve through a public gradio.live link.")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available).")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run the model code stored with the model (see the predict CLI's option).")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.model == DEFAULT_MODEL and not os.path.exists(DEFAULT_MODEL):
        sys.exit(f"error: there is no model at {DEFAULT_MODEL}. Train the built-in one first "
                 f"(python run_detection.py --output_dir {DEFAULT_MODEL}, about 10 minutes on a CPU), or give one: "
                 "python app.py --model FOLDER_OR_HUB_ID.")
    detector = Detector(args.model, args.device, args.trust_remote_code)
    examples = write_examples(Path(tempfile.mkdtemp(prefix="dit-demo-examples-")))
    build_demo(detector, examples).launch(server_name=args.host, server_port=args.port, share=args.share,
                                          allowed_paths=[str(examples[0].parent)])


if __name__ == "__main__":
    main()
