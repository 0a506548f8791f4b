"""recipes/accelerate/*.yaml are valid accelerate configs; FSDP's wrap policy finds every backbone's layers."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from deepsynth.models import load_model

CONFIGS = Path(__file__).parents[2] / "recipes" / "accelerate"


@pytest.mark.parametrize("name,kind", [("ddp", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP),
                                       ("deepspeed-zero2", DistributedType.DEEPSPEED)])
def test_config_loads(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.mixed_precision == "bf16"
    if kind == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # the recipe's value is used


def test_fsdp_launch_env_builds_a_plugin_that_wraps_each_backbone(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
                                               "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    for name in ("tiny", "tiny-qwen2-vl"):
        model, _ = load_model(name)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        plugin.set_auto_wrap_policy(model)  # raises if a layer class is missing from the model
        assert any("DecoderLayer" in c for c in plugin.transformer_cls_names_to_wrap)
