"""Publishing a trained detector folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

# Training state that does not belong in a model repo: checkpoints (optimizer states included) and the stage-one
# weights. The TensorBoard logs under stage*/runs/ are uploaded: the Hub shows them in a "Training metrics" tab.
# training_args.bin is a pickle of the TrainingArguments, --hub_token included: it stays local.
IGNORE_PATTERNS = ["stage*/checkpoint-*/**", "stage1/final/**", "stage1/completed", "checkpoint-*/**",
                   "training_args.bin", "**/training_args.bin"]


WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def check_model_folder(folder, need_processor: bool = False) -> Path:
    """`folder` as a Path if it holds a saved model (what `save_pretrained` or run_detection.py's `--output_dir`
    writes: `config.json` and weights, plus `preprocessor_config.json` when `need_processor`); else a
    FileNotFoundError or ValueError that names the folder, what is missing and what to give instead.

    Only the top level is looked at and nothing is loaded: this is the cheap check that runs before anything slow or
    remote (a Hub repo created for a typo'd folder, a model loaded before the inputs are found).
    """
    folder = Path(folder)
    what = "a folder written by save_pretrained or by run_detection.py (its --output_dir)"
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; give {what}.")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a model folder; give {what}.")
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise ValueError(f"{folder} is not a saved model: it has no {CONFIG_NAME}; give {what}.")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config} is not a model config ({error}); give {what}.") from None
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        raise ValueError(f"{folder} is not a saved model: it has no weights ({', '.join(WEIGHTS_FILES)}); "
                         f"give {what}.")
    if need_processor and not (folder / IMAGE_PROCESSOR_NAME).is_file():
        raise ValueError(f"{folder} has no {IMAGE_PROCESSOR_NAME} (the image processor); save one there with "
                         "processor.save_pretrained(folder), or give a folder that run_detection.py wrote.")
    return folder


def files_to_upload(folder) -> list[str]:
    """The paths (relative, POSIX) of `folder` that `push_folder_to_hub` uploads, filtered as `upload_folder`
    filters them."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + [".git/**", ".cache/**"]))


def push_folder_to_hub(folder, repo_id: str, token: str | None = None, private: bool | None = None,
                       commit_message: str = "Upload DiT object detector", api: HfApi | None = None) -> str | None:
    """Create `repo_id` if needed and upload `files_to_upload(folder)` (model, processor, code, card, metrics,
    preview, TensorBoard logs) in one commit.

    A failed upload never touches the local folder; it is logged with the command that retries it, and None is
    returned instead of the commit URL. A `folder` that is not a saved model (see `check_model_folder`) raises before
    the Hub is contacted, so no empty repo is created for it.
    """
    folder = check_model_folder(folder)
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                   ignore_patterns=IGNORE_PATTERNS, repo_type="model")
    except Exception as error:  # network, auth, quota: the trained model must survive any of them
        retry = (f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} . --repo-type model "
                 + " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in IGNORE_PATTERNS))
        logger.error("Pushing %s to the Hub failed (%s: %s). The local output is intact; retry with:\n  %s",
                     folder, type(error).__name__, error, retry)
        return None
    logger.info("Pushed %s to %s", folder, commit)
    return str(commit)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modeling_dit_detection.hub",
                                     description="Upload a run_detection.py output folder to the Hugging Face Hub "
                                                 "(without its checkpoints).")
    parser.add_argument("folder", help="The output folder (model, processor, code, card, metrics).")
    parser.add_argument("repo_id", help="The model repo, e.g. your-name/dit-xl-2-256-cppe5; created if missing.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or HF_TOKEN).")
    args = parser.parse_args(argv)
    # Both checks are local: a wrong argument must never leave an empty repo behind on the Hub.
    try:
        check_model_folder(args.folder)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"{error} Nothing was sent to the Hub.")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        parser.error(f"repo_id {args.repo_id!r} is not a Hub repo id ({error}). Nothing was sent to the Hub.")
    url = push_folder_to_hub(args.folder, args.repo_id, token=args.token, private=args.private or None)
    raise SystemExit(0 if url else 1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
