import pytest
import torch
from helpers import SMALL_JOB, StageRecorder, load_run_detection


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_job(tmp_path_factory):
    """(output folder, returned metrics, StageRecorder) of one SMALL_JOB run, shared by the tests that read it."""
    run_detection = load_run_detection()
    output_dir = tmp_path_factory.mktemp("job") / "synthetic-tiny"
    recorder = StageRecorder()
    metrics = run_detection.run(*run_detection.parse_arguments([*SMALL_JOB, "--output_dir", str(output_dir)]),
                                callbacks=[recorder])
    return output_dir, metrics, recorder
