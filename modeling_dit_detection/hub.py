"""Publishing a trained detector folder to the Hugging Face Hub."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

logger = logging.getLogger(__name__)

# Training state that does not belong in a model repo: checkpoints (optimizer states included) and the stage-one
# weights. The TensorBoard logs under stage*/runs/ are uploaded: the Hub shows them in a "Training metrics" tab.
# training_args.bin is a pickle of the TrainingArguments, --hub_token included: it stays local.
IGNORE_PATTERNS = ["stage*/checkpoint-*/**", "stage1/final/**", "stage1/completed", "checkpoint-*/**",
                   "training_args.bin", "**/training_args.bin"]


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
    returned instead of the commit URL.
    """
    api = api or HfApi(token=token)
    folder = Path(folder)
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
    url = push_folder_to_hub(args.folder, args.repo_id, token=args.token, private=args.private or None)
    raise SystemExit(0 if url else 1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
