"""dvtrain.utils: the one free-port, threads-per-rank and atomic-JSON helpers."""

import json
import socket
from pathlib import Path

import pytest

from dvtrain import dist
from dvtrain.utils import free_port, threads_per_rank, write_json_atomic


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"b": 1, "a": Path("/x"), "n": [1.5]}, sort_keys=True)
    text = path.read_text()
    assert text == '{\n  "a": "/x",\n  "b": 1,\n  "n": [\n    1.5\n  ]\n}\n'
    write_json_atomic(path, {"status": "done"})  # replaces
    assert json.loads(path.read_text()) == {"status": "done"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        write_json_atomic(path, circular)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert json.loads(path.read_text()) == {"status": "done"}  # the old file survives a failed write


def test_free_port_is_bindable_and_rules_are_shared():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert dist.free_port is free_port and dist.threads_per_rank is threads_per_rank  # re-exports, not copies
    assert threads_per_rank(2, num_cores=2) == 1 and threads_per_rank(3, num_cores=16) == 5
