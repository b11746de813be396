"""The Typer CLI: help, validate, show, user errors without tracebacks."""

import json
from pathlib import Path

from typer.testing import CliRunner

from dvtrain.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("validate", "show"):
        assert cmd in res.output


def test_validate_ok_summary():
    res = runner.invoke(app, ["validate", str(REPO / "recipes/vitg14.yaml"), "--world-size", "8"])
    assert res.exit_code == 0, res.output
    assert "vit_giant2/14" in res.output and "global batch 96 on 8 rank(s)" in res.output
    assert "625000 iterations" in res.output


def test_validate_reports_every_problem_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  patch_size: 14\ncrops:\n  global_size: 320\n  local_size: 96\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1
    assert "crops.global_size=320" in res.output and "use 308 or 322" in res.output
    assert "crops.local_size=96" in res.output and "use 98" in res.output
    assert "Traceback" not in res.output


def test_validate_missing_file_and_syntax(tmp_path):
    res = runner.invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "recipe file not found" in res.output
    bad = tmp_path / "syntax.yaml"
    bad.write_text("a: [1\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1 and "line 2" in res.output and "Traceback" not in res.output


def test_show_derived_and_ds_config():
    res = runner.invoke(
        app, ["show", str(REPO / "recipes/vits14.yaml"), "--set", "optim.base_lr=8e-3", "-w", "16"]
    )
    assert res.exit_code == 0, res.output
    text = res.output
    assert "base_lr: 0.008" in text
    derived = json.loads(text.split("# derived\n")[1].split("# deepspeed config\n")[0])
    assert derived["global_batch"] == 1024 and derived["lr"] == 0.008
    ds = json.loads(text.split("# deepspeed config\n")[1].split("# networks")[0])
    assert ds["train_batch_size"] == 1024 and ds["zero_optimization"]["stage"] == 3
    networks = text.split("# networks (global batch 1024)\n")[1].splitlines()
    assert networks[0].startswith("student: ") and networks[1].startswith("teacher (EMA of the student): ")


def test_validate_warns_on_a_missing_local_data_path(tmp_path):
    """validate warns (exit 0) where launch would stop; a valid MDS directory gives no warning."""
    missing = tmp_path / "no-such-mds"
    res = runner.invoke(app, ["validate", str(REPO / "recipes/smoke_cpu.yaml"), "--set", f"data.path={missing}"])
    assert res.exit_code == 0, res.output
    assert f"warning: data.path={missing}: no such directory; convert images first" in res.output
    assert "`dvtrain launch` would stop here" in res.output and "ok " in res.output
    (tmp_path / "mds").mkdir()
    res = runner.invoke(app, ["validate", str(REPO / "recipes/smoke_cpu.yaml"), "--set", f"data.path={tmp_path / 'mds'}"])
    assert res.exit_code == 0 and "not an MDS dataset (no index.json)" in res.output
    (tmp_path / "mds" / "index.json").write_text("{}")
    res = runner.invoke(app, ["validate", str(REPO / "recipes/smoke_cpu.yaml"), "--set", f"data.path={tmp_path / 'mds'}"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_set_unknown_path_is_error():
    res = runner.invoke(app, ["validate", str(REPO / "recipes/vits14.yaml"), "--set", "model.archh=vit_base"])
    assert res.exit_code == 1
    assert "unknown recipe field; did you mean model.arch?" in res.output
