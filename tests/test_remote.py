"""Object-store pre-flight against a real local S3 server (moto's server mode on 127.0.0.1).

Covers: missing credentials, a closed endpoint port, an endpoint that accepts but never answers (the
bound), a missing bucket, a bucket without a dataset, and a dataset written there by
``dvtrain data convert`` that ``validate`` and the launch pre-flight accept and the training loader
reads (streaming's S3 client, configured by the same variables the pre-flight checks). The launch subprocess
shows the user's view: one message naming the URL and the variables, exit 1, no traceback, before any
engine is built.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from PIL import Image
from typer.testing import CliRunner

from dvtrain.cli import app
from dvtrain.data.remote import check_remote, is_remote, split_url
from dvtrain.launch import check_data_location
from dvtrain.dist import find_free_port

REPO = Path(__file__).resolve().parent.parent
BUCKET = "dvtrain-preflight"
runner = CliRunner()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No credentials from the machine: env cleared, config files pointed at nothing, no instance metadata."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API server (moto) on a free local port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _with_credentials(env, endpoint: str) -> None:
    env.setenv("S3_ENDPOINT_URL", endpoint)
    env.setenv("AWS_ACCESS_KEY_ID", "test-key")
    env.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")


def _make_bucket(endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key",
                          aws_secret_access_key="test-secret", region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=BUCKET)


def test_is_remote_is_the_one_rule():
    assert is_remote("s3://bucket/x") and is_remote("gs://b/x") and is_remote("dbfs:/Volumes/x")
    assert is_remote("ftp://host/x")  # remote, but unsupported: check_remote says so
    assert not is_remote("data/mds/train") and not is_remote("/abs/path") and not is_remote(r"C:\data\mds")
    assert not is_remote("runs/a:b/mds")  # a colon alone does not make a URL
    assert split_url("s3://bucket/a/b/") == ("s3", "bucket", "a/b")


def test_unsupported_scheme_and_missing_bucket_name():
    with pytest.raises(ValueError, match=r"data.path=ftp://host/x: unsupported object store.*s3://, gs://"):
        check_remote("ftp://host/x")
    with pytest.raises(ValueError, match=r"s3:///x: no bucket in the URL; expected s3://BUCKET/PREFIX"):
        check_remote("s3:///x")


def test_missing_credentials_names_url_and_variables(aws_env, s3_server):
    aws_env.setenv("S3_ENDPOINT_URL", s3_server)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as exc:
        check_data_location(f"s3://{BUCKET}/mds")
    msg = str(exc.value)
    assert msg.startswith(f"data.path=s3://{BUCKET}/mds: no object-store credentials found")
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "AWS_PROFILE" in msg
    assert f"{s3_server} (S3_ENDPOINT_URL)" in msg
    assert time.monotonic() - t0 < 5


def test_unknown_profile(aws_env):
    aws_env.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ValueError, match=r"\(no-such-profile\) could not be found; set AWS_PROFILE"):
        check_remote(f"s3://{BUCKET}/mds")


def test_closed_endpoint_port_names_the_endpoint_variable(aws_env):
    endpoint = f"http://127.0.0.1:{find_free_port()}"  # nothing listens there any more
    _with_credentials(aws_env, endpoint)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as exc:
        check_data_location(f"s3://{BUCKET}/mds")
    msg = str(exc.value)
    assert f"data.path=s3://{BUCKET}/mds: cannot reach the object store at {endpoint} (S3_ENDPOINT_URL)" in msg
    assert "check S3_ENDPOINT_URL" in msg
    assert time.monotonic() - t0 < 10


def test_silent_endpoint_is_bounded(aws_env):
    """A server that accepts connections but never answers: the check gives up within its bound."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        _with_credentials(aws_env, endpoint)
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"S3_ENDPOINT_URL") as exc:
            check_remote(f"s3://{BUCKET}/mds", timeout_s=3)
        elapsed = time.monotonic() - t0
    assert elapsed < 6, elapsed
    assert endpoint in str(exc.value)


def test_missing_bucket_and_missing_dataset(aws_env, s3_server):
    _with_credentials(aws_env, s3_server)
    with pytest.raises(ValueError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+ "
                                         r"\(S3_ENDPOINT_URL\)"):
        check_remote("s3://no-such-bucket/mds")
    with pytest.raises(ValueError, match=r"OUT=s3://no-such-bucket/mds: bucket 'no-such-bucket' does not exist"):
        check_remote("s3://no-such-bucket/mds", "OUT", expect_dataset=False)
    _make_bucket(s3_server)
    check_remote(f"s3://{BUCKET}/empty", "OUT", expect_dataset=False)  # a conversion may write there
    with pytest.raises(ValueError, match=rf"not an MDS dataset \(no empty/index.json in bucket '{BUCKET}'\); "
                                         rf"write one with `dvtrain data convert SRC s3://{BUCKET}/empty`"):
        check_remote(f"s3://{BUCKET}/empty")


def test_convert_to_bucket_then_validate_and_preflight_pass(aws_env, s3_server, tmp_path):
    _with_credentials(aws_env, s3_server)
    _make_bucket(s3_server)
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 16), (40 * i, 200 if cls == "a" else 10, 90)).save(src / cls / f"{i}.png")
    url = f"s3://{BUCKET}/converted"
    res = runner.invoke(app, ["data", "convert", str(src), url, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"wrote 6 samples to {url}" in res.output
    client = boto3.client("s3", endpoint_url=s3_server)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="converted/")["Contents"]}
    assert {"converted/index.json", "converted/manifest.json"} <= keys

    check_remote(url)
    check_data_location(url)
    # the training loader reads it through streaming with the same variables (S3_ENDPOINT_URL, AWS_*)
    from dvtrain.data.loader import build_loader

    loader = build_loader(local=str(tmp_path / "cache"), remote=url, batch_size=4, transform=lambda x: {"image": x},
                          collate_fn=lambda items: items, num_workers=0, shuffle=False)
    batch = next(iter(loader))
    assert [s["key"] for s in batch] == ["a/0.png", "a/1.png", "a/2.png", "b/0.png"]
    assert batch[1]["image"][:, 0, 0].tolist() == [40, 200, 90] and batch[1]["image"].shape == (3, 16, 21)
    res = runner.invoke(app, ["validate", str(REPO / "recipes/smoke_cpu.yaml"), "--set", f"data.path={url}"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output

    # the same URL without credentials: validate warns (exit 0), convert refuses before reading images
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    res = runner.invoke(app, ["validate", str(REPO / "recipes/smoke_cpu.yaml"), "--set", f"data.path={url}"])
    assert res.exit_code == 0, res.output
    assert f"warning: data.path={url}: no object-store credentials found" in res.output
    res = runner.invoke(app, ["data", "convert", str(src), f"s3://{BUCKET}/again", "--no-progress"])
    assert res.exit_code == 1 and f"OUT=s3://{BUCKET}/again: no object-store credentials" in res.output
    assert "Traceback" not in res.output


def test_launch_without_credentials_fails_before_the_engine(aws_env, s3_server, tmp_path):
    """The user's view: `dvtrain launch` with an s3:// data.path and no credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    env["S3_ENDPOINT_URL"] = s3_server
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dvtrain", "launch", str(REPO / "recipes/smoke_cpu.yaml"), "-o", str(tmp_path / "run"),
         "--set", f"data.path=s3://{BUCKET}/mds"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"error: data.path=s3://{BUCKET}/mds: no object-store "
                                                       "credentials found"), proc.stderr
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "S3_ENDPOINT_URL" in lines[0]
    assert "Traceback" not in proc.stderr and "DeepSpeed" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # nothing started
    assert elapsed < 60, elapsed
