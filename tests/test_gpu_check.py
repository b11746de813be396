"""The GPU acceptance check (benchmarks/gpu_check.sh): its CPU dry run end to end through the shell entry
point, the per-step timeout that kills a hanging command, and the offline wheel set of gpu_wheels.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run", "--workdir",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["mode"] == "dry-run" and rep["ok"] is True and rep["failed"] == []
    steps = rep["steps"]
    assert list(steps) == ["install", "environment", "pytest_gpu", "bench_kernels", "train_step", "smoke_run", "resume"]
    for name, s in steps.items():
        assert s["status"] in ("passed", "skipped"), (name, s)
        assert s["budget_s"] > 0
        if s["status"] == "skipped":
            assert s["reason"], name
    # CUDA-only steps are skipped with their reason; the rest really ran
    assert {n for n, s in steps.items() if s["status"] == "skipped"} == {"install", "pytest_gpu", "bench_kernels"}
    assert "CUDA only" in steps["pytest_gpu"]["reason"] and "CUDA only" in steps["bench_kernels"]["reason"]
    env_d = steps["environment"]["details"]
    assert env_d["cuda_available"] is False and env_d["deepspeed_accelerator"] == "cpu" and env_d["torch"]

    ts = steps["train_step"]["details"]
    assert "CUDA only" in ts["skipped"]["zero3_vs_plain_fp16"]
    pair = ts["zero3_vs_plain_bf16"]
    for variant in ("plain", "zero3"):
        assert pair[variant]["images_per_s"] > 0 and 0 < pair[variant]["mfu"] < 1
        assert pair[variant]["skipped_steps"] == 0
    # the ratio is the two measured step times, and checkpointing keeps fewer activations for backward
    assert pair["zero3_over_plain_step_time"] == pytest.approx(pair["zero3"]["step_ms"] / pair["plain"]["step_ms"])
    assert 0 < ts["act_ckpt_memory_ratio"] < 1

    smoke = steps["smoke_run"]["details"]
    assert smoke["status"] == "done" and smoke["iterations"] == 6 and smoke["skipped_steps"] == 0
    assert smoke["data"]["samples"] == {"train": 384, "test": 192}
    assert 20.0 <= smoke["knn_top1"] <= 100.0

    rs = steps["resume"]["details"]
    assert rs["stopped_status"] == "stopped" and 2 <= rs["stopped_at"] < 6
    assert rs["resumed_status"] == "done" and rs["resumed_iterations"] == 6
    # on a CPU the resumed run repeats the uninterrupted one's per-iteration losses
    assert rs["losses"]["resumed"] == pytest.approx(rs["losses"]["straight"], rel=1e-4)
    assert rs["max_rel_diff_first5_after_resume"] <= 1e-4

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# dvtrain GPU check (dry-run)") and "PASSED" in md
    for name in steps:
        assert f"| {name} |" in md
    assert "$ " in (out / "gpu_check.log").read_text()  # every command with its output
    print(f"dry run: {wall:.0f} s")


def test_step_timeout_kills_the_command_and_is_reported(tmp_path):
    gc = _load("gpu_check")
    with (tmp_path / "log").open("w") as log:
        runner = gc.Runner(log, dict(os.environ))
        runner.deadline = time.monotonic() + 0.5
        marker = tmp_path / "child_alive"
        # a command whose child would write a file after 1.5 s: killing the process group must stop it too
        cmd = ["bash", "-c", f"(sleep 1.5; touch {marker}) & sleep 30"]
        t0 = time.monotonic()
        with pytest.raises(gc.StepTimeout, match="budget ran out"):
            runner.run(cmd)
        assert time.monotonic() - t0 < 6
    time.sleep(2.0)
    assert not marker.exists()
    assert "killed after the step's budget ran out" in (tmp_path / "log").read_text()


def test_check_reports_timed_out_and_failed_steps_in_json(tmp_path):
    gc = _load("gpu_check")
    check = gc.Check(tmp_path, gpu=False, wheels=None, work=tmp_path / "w", only=None)
    check.budgets = dict(check.budgets, environment=1)

    def hang(c):
        c.run.run(["sleep", "20"])

    def broken(c):
        raise gc.StepFailed("a check did not hold", {"value": 3})

    check.run_step("environment", hang)
    check.run_step("train_step", broken)
    check.write()
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["ok"] is False and rep["failed"] == ["environment", "train_step"]
    assert rep["steps"]["environment"]["status"] == "timed_out" and rep["steps"]["environment"]["duration_s"] < 10
    assert rep["steps"]["train_step"] == {"budget_s": gc.BUDGETS_DRY["train_step"], "status": "failed",
                                          "reason": "a check did not hold", "details": {"value": 3},
                                          "duration_s": rep["steps"]["train_step"]["duration_s"]}
    assert "FAILED: environment, train_step" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_budgets_fit_nine_minutes():
    gc = _load("gpu_check")
    assert set(gc.BUDGETS_GPU) == {name for name, _ in gc.STEPS}
    assert sum(gc.BUDGETS_GPU.values()) <= gc.TOTAL_BUDGET_S <= 9 * 60
    assert sum(share for *_, share in gc.TRAIN_RUNS) == pytest.approx(1.0)


def test_wheel_set_for_the_h200_image():
    gw = _load("gpu_wheels")
    have = gw.read_have(REPO / "benchmarks" / "gpu_target_packages.txt")
    assert {"torch", "triton", "numpy", "typer", "pyyaml"} <= have and "pydantic" not in have
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    need, missing = gw.closure("dvtrain", have | gw.FROM_TARGET | gw.OBJECT_STORE_ONLY, env)
    assert missing == []
    # what the image lacks travels; its own torch stack and the object-store SDKs do not
    assert {"deepspeed", "pydantic", "pydantic-core", "mosaicml-streaming", "wandb", "hjson"} <= set(need)
    assert not set(need) & {"torch", "torchvision", "triton", "numpy", "boto3", "oci", "google-cloud-storage"}
    assert all(not n.startswith(("nvidia-", "cuda-")) for n in need)


def _wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_install_plan_adds_missing_and_upgrades_only_what_a_requirement_needs(tmp_path):
    gc = _load("gpu_check")
    wheels = [
        _wheel(tmp_path, "pydantic", "2.14.4", "typing-extensions>=4.16.0", "pydantic-core==2.50.5"),
        _wheel(tmp_path, "pydantic_core", "2.50.5", "typing-extensions>=4.14.1"),
        _wheel(tmp_path, "typing_extensions", "4.16.0"),
        _wheel(tmp_path, "click", "8.5.1"),
        _wheel(tmp_path, "protobuf", "7.36.2"),
        _wheel(tmp_path, "wandb", "0.31.0", "click>=8.2.0", "protobuf<8,>=5", "pydantic<3,>=2.6",
               "sentry-sdk>=2; extra == 'sentry'"),
    ]
    machine = {"typing-extensions": "4.10.0", "click": "8.9.0", "protobuf": "6.33.0", "torch": "2.11.0"}
    take, replaced = gc.plan_install(wheels, machine, ["torch>=2.4,<2.15", "wandb>=0.18", "pydantic>=2.6,<3"])
    # missing packages come from the wheels; pydantic needs typing-extensions>=4.16, so the machine's 4.10 is
    # replaced; click 8.9 and protobuf 6.33 satisfy every requirement and stay (nothing is downgraded)
    assert set(take) == {"pydantic", "pydantic-core", "wandb", "typing-extensions"}
    assert take["pydantic"] == wheels[0] and take["typing-extensions"] == wheels[2]
    assert set(replaced) == {"typing-extensions"}
    assert replaced["typing-extensions"]["machine"] == "4.10.0" and replaced["typing-extensions"]["wheel"] == "4.16.0"
    assert replaced["typing-extensions"]["because"] in ("typing-extensions>=4.16.0", "typing-extensions>=4.14.1")
    # a machine whose packages all fit takes only what it lacks
    take, replaced = gc.plan_install(wheels, {"typing-extensions": "4.16.0", "pydantic": "2.14.4",
                                              "pydantic-core": "2.50.5"}, ["wandb"])
    assert set(take) == {"wandb", "click", "protobuf"} and replaced == {}


def test_kernel_bench_summary_reads_the_bench_shapes_and_flags_a_bxb_buffer():
    from dvtrain.bench import KOLEO_SHAPES, SWIGLU_SHAPES, TOKENS_PER_GLOBAL_CROP

    gc = _load("gpu_check")
    rows = []
    for arch, H, images in SWIGLU_SHAPES:
        shape = f"{arch} M={images * TOKENS_PER_GLOBAL_CROP} H={H}"
        for impl, ms in (("ours", 1.0), ("eager", 2.0), ("compiled", 1.25)):
            rows.append({"kernel": "swiglu", "shape": shape, "impl": impl, "full_ms": ms, "peak_mib": 10.0 * ms,
                         "error": None})
    for B, D in KOLEO_SHAPES:
        for impl, ms, mib in (("ours", 3.0, 8.0 + D / 1024), ("eager", 1.5, 200.0), ("compiled", 1.0, 150.0)):
            rows.append({"kernel": "koleo", "shape": f"B={B} D={D}", "impl": impl, "full_ms": ms, "peak_mib": mib,
                         "error": None})
    d = gc.summarize_kernel_bench({"results": rows})
    assert d["errors"] == []
    assert [r["shape"].split()[0] for r in d["swiglu"]] == ["vit_large", "vit_giant2"]
    assert [r["shape"] for r in d["koleo"]] == ["B=4096 D=1024", "B=4096 D=1536"]  # ViT-L and ViT-g widths
    assert d["swiglu"][0]["ours_over_eager"] == 0.5 and d["swiglu"][0]["ours_over_compiled"] == 0.8
    assert all(r["no_bxb_buffer"] for r in d["koleo"]) and d["koleo"][0]["bxb_fp32_mib"] == 64.0
    assert d["slower_than_eager"] == ["B=4096 D=1024 (2.00x eager)", "B=4096 D=1536 (2.00x eager)"]
    # a KoLeo that holds a B x B fp32 matrix, and a failed Triton row, are errors
    big = next(r for r in rows if r["shape"] == "B=4096 D=1536" and r["impl"] == "ours")
    big["peak_mib"] = 70.0
    next(r for r in rows if r["shape"].startswith("vit_giant2") and r["impl"] == "ours").update(
        full_ms=None, error="CompilationError: out of resources")
    d = gc.summarize_kernel_bench({"results": rows})
    assert any("B=4096 D=1536: peak 70.0 MiB >= one B x B fp32 buffer (64 MiB)" in e for e in d["errors"])
    assert any("out of resources" in e for e in d["errors"])
    assert any(e == "swiglu vit_giant2: no measurement of the Triton kernel" for e in d["errors"])


def test_junit_outcomes(tmp_path):
    gc = _load("gpu_check")
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_kernels_swiglu" name="test_cuda_matches_reference[1]"/>'
        '<testcase classname="tests.test_kernels_koleo" name="test_cuda_compiles"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_vit" name="test_xformers"><skipped message="no xformers"/></testcase>'
        '</testsuite></testsuites>')
    res = gc._junit(xml)
    assert res == {"passed": ["tests.test_kernels_swiglu::test_cuda_matches_reference[1]"],
                   "failed": ["tests.test_kernels_koleo::test_cuda_compiles: boom"],
                   "skipped": {"tests.test_vit::test_xformers": "no xformers"}}


def test_bench_shape_selection_is_what_the_check_asks_for():
    import torch

    from dvtrain.bench import _cases

    labels = [label for _, label, *_ in _cases(torch.device("cpu"), quick=False,
                                               select=["vit_large", "vit_giant2", "B=4096"])]
    assert labels == ["vit_large M=16448 H=2736", "vit_giant2 M=6168 H=4096",
                      "B=4096 D=384", "B=4096 D=1536", "B=4096 D=1024"]
    assert len(list(_cases(torch.device("cpu"), quick=False))) == 4 + 9
