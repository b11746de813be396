"""Launch pre-flight checks, hostfiles, sweep argument parsing and the launcher command (no training)."""

from pathlib import Path

import pytest
import yaml

from dvtrain.launch import (
    check_data_location,
    check_output_dir,
    deepspeed_command,
    hostfile_world_size,
    overrides_from_extra_args,
    overrides_from_sweep_params,
)
from dvtrain.recipe import RecipeError, dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


def test_agent_args_become_overrides():
    assert overrides_from_extra_args(["--optim.base_lr=0.001", "--loss.koleo_weight", "0.05"]) == [
        "optim.base_lr=0.001",
        "loss.koleo_weight=0.05",
    ]
    with pytest.raises(RecipeError, match="overrides look like --optim.base_lr=2e-4"):
        overrides_from_extra_args(["optim.base_lr=1"])
    with pytest.raises(RecipeError, match="has no value"):
        overrides_from_extra_args(["--optim.base_lr"])


def test_sweep_param_file(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"wandb_version": 1, "optim.base_lr": {"value": 0.002}, "model.arch": {"value": "vit_base"}}))
    assert sorted(overrides_from_sweep_params(p)) == ["model.arch=vit_base", "optim.base_lr=0.002"]
    p.write_text(yaml.safe_dump({"optim.lr": {"value": 1}}))
    with pytest.raises(RecipeError, match="'optim.lr' is not a recipe field"):
        overrides_from_sweep_params(p)
    assert overrides_from_sweep_params(tmp_path / "absent.yaml") == []


def test_data_location_checks(tmp_path):
    with pytest.raises(ValueError, match=r"data.path=.*no such directory; convert images first"):
        check_data_location(str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="not an MDS dataset"):
        check_data_location(str(tmp_path / "d"))
    (tmp_path / "d" / "index.json").write_text("{}")
    check_data_location(str(tmp_path / "d"))
    # object stores: tests/test_remote.py (credentials, endpoint, bucket, dataset against a local S3 server)
    with pytest.raises(ValueError, match="unsupported object store"):
        check_data_location("ftp://host/x")


def test_output_dir_holding_another_run(tmp_path):
    r = load_recipe(REPO / "recipes/smoke_cpu.yaml")
    run = tmp_path / "run"
    assert check_output_dir(run, r, resume=False) is False  # new
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(r))
    assert check_output_dir(run, r, resume=True) is True
    other = r.model_copy(update={"seed": 7})
    with pytest.raises(ValueError, match=r"holds a different run \(recipe differs at seed\)"):
        check_output_dir(run, other, resume=True)
    # logging cadence may change on resume
    louder = recipe_from_dict({**r.model_dump(), "wandb": {**r.wandb.model_dump(), "log_every": 1}})
    assert check_output_dir(run, louder, resume=True) is True
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a dvtrain run directory"):
        check_output_dir(junk, r, resume=False)


def test_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nworker-0 slots=8\nworker-1 slots=8\n\n")
    assert hostfile_world_size(hf) == 16
    hf.write_text("worker-0 8\n")
    with pytest.raises(ValueError, match="line 1 'worker-0 8': expected 'HOSTNAME slots=N'"):
        hostfile_world_size(hf)
    with pytest.raises(ValueError, match="no such file"):
        hostfile_world_size(tmp_path / "none")


def test_deepspeed_command_shape(tmp_path):
    cmd = deepspeed_command(Path("r.yaml"), ["optim.base_lr=1e-3"], tmp_path, False, 2, None, master_port=29999)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[3:15] == ["--num_nodes", "1", "--num_accelerators", "2", "--master_port", "29999", "--module",
                         "--no_local_rank", "--log_level", "warning", "dvtrain", "launch"]
    assert cmd[-5:] == ["--output-dir", str(tmp_path), "--worker", "--set", "optim.base_lr=1e-3"][-5:]
    hf_cmd = deepspeed_command(Path("r.yaml"), [], tmp_path, True, None, Path("hosts"), master_port=1)
    assert hf_cmd[3:5] == ["--hostfile", "hosts"] and hf_cmd[-1] == "--resume"
    verbose = deepspeed_command(Path("r.yaml"), [], tmp_path, False, 2, None, master_port=1, verbose=True)
    assert verbose[verbose.index("--log_level") + 1] == "info" and verbose[-1] == "--verbose"
