"""configs/accelerate: every file goes through Accelerate's own loading and `accelerate launch`'s argument handling,
and says what it promises: the distributed type, bf16, FSDP units that are real classes of our model, DeepSpeed json
that the Trainer can fill. Nothing here needs a GPU; what runs where is in the README's "Scaling out"."""

import json
import os
from unittest import mock

import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from helpers import ROOT, tiny_config

from modeling_dit_detection import DiTForObjectDetection
from modeling_dit_detection.modeling_dit_backbone import DiTBlock
from modeling_dit_detection.modeling_dit_detection import DiTDetectionDecoderLayer

CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # file -> (distributed type, processes, machines)
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "ddp.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "two_nodes.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 8, 1),
}


def _launch_args(name: str, *extra: str):
    """The arguments `accelerate launch --config_file configs/accelerate/<name> ... run_detection.py` works with,
    after Accelerate merged the file into them (run from the repository root, as the files say)."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *extra, "run_detection.py"])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        args, _, _ = _validate_launch_command(args)
    finally:
        os.chdir(cwd)
    return args


def test_the_folder_holds_exactly_the_documented_configs():
    assert {path.name for path in CONFIGS.glob("*.yaml")} == set(EXPECTED)
    readme = (ROOT / "README.md").read_text()
    for name in EXPECTED:
        assert f"configs/accelerate/{name}" in readme, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_through_accelerate_and_states_its_command(name):
    config = ClusterConfig.from_yaml_file(CONFIGS / name)  # unknown keys are an error there
    distributed_type, processes, machines = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines, config.use_cpu) == (processes, machines, False)
    header = [line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file configs/accelerate/{name}" in line for line in header), name
    assert any("run_detection.py" in line for line in header) and any("--bf16 true" in line for line in header)


@pytest.mark.parametrize("name", ["single_gpu.yaml", "ddp.yaml", "two_nodes.yaml", "fsdp.yaml"])
def test_torch_configs_launch_with_bf16(name):
    args = _launch_args(name)
    assert args.mixed_precision == "bf16"
    if name != "single_gpu.yaml":
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.num_machines == EXPECTED[name][2]


def test_two_node_config_names_the_main_machine():
    args = _launch_args("two_nodes.yaml", "--machine_rank", "1")
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 16)
    assert args.main_process_ip and args.main_process_port == 29500


def test_fsdp_plugin_wraps_real_classes_of_our_model_with_original_parameters():
    env = prepare_multi_gpu_env(_launch_args("fsdp.yaml"))
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    # sync_module_states asks the plugin for the current GPU, which this test may not have; the file's value is
    # checked above, the plugin is built without it here.
    with mock.patch.dict(os.environ, {**env, "FSDP_SYNC_MODULE_STATES": "false"}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params  # stage one freezes part of each FSDP unit
    assert str(plugin.sharding_strategy).endswith("FULL_SHARD")
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")  # save_model writes model.safetensors
    assert set(plugin.transformer_cls_names_to_wrap) == {DiTBlock.__name__, DiTDetectionDecoderLayer.__name__}
    # Accelerate resolves the names against the model (an unknown name is an error there) into the wrap policy.
    model = DiTForObjectDetection(tiny_config())
    plugin.set_auto_wrap_policy(model)
    units = {type(module) for module in model.modules() if plugin.auto_wrap_policy(module, False, 0)}
    assert units == {DiTBlock, DiTDetectionDecoderLayer}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_point_at_json_the_trainer_fills(stage):
    args = _launch_args(f"deepspeed_zero{stage}.yaml")
    assert args.use_deepspeed and args.deepspeed_config_file == f"configs/accelerate/ds_zero{stage}.json"
    ds = json.loads((ROOT / args.deepspeed_config_file).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # The Trainer fills "auto" from run_detection.py's arguments; a number here could contradict them.
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto"
    if stage == 3:  # without it, save_model under ZeRO-3 writes no usable weights
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    args.deepspeed_fields_from_accelerate_config = "deepspeed_config_file,zero3_init_flag"  # as launch_command sets
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"configs/accelerate/ds_zero{stage}.json"
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not a dependency; with it installed, the "
                                    "plugin is built from the file too")
    from accelerate.utils import DeepSpeedPlugin

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed_config_file)
    finally:
        os.chdir(cwd)
    assert plugin.zero_stage == stage and deepspeed.__version__
