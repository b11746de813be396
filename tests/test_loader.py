"""Streaming loader: exact resume (fresh process, epoch end, 2 ranks), shuffling, bad samples,
multi-crop integration, worker threads, stale shared memory."""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvtrain.data.loader import build_loader
from dvtrain.data.shards import COLUMNS, convert_to_mds
from dvtrain.dist import find_free_port

REPO = Path(__file__).resolve().parents[1]
FMNIST_TEST = REPO / "data" / "fashion_mnist" / "t10k-images-idx3-ubyte.gz"

CHILD = textwrap.dedent("""
    import json, os, sys
    args = json.loads(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    from dvtrain.data.loader import build_loader
    loader = build_loader(local=args["local"], batch_size=args["batch_size"],
                          transform=lambda x: {"hw": tuple(x.shape)},
                          collate_fn=lambda s: [x["key"] for x in s],
                          num_workers=args["workers"], shuffle=args["shuffle"], seed=0,
                          drop_last=args["drop_last"], clean_stale_shm=args.get("clean", False))
    if args.get("state"):
        loader.load_state_dict(args["state"])
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == args["num_batches"]:
            break
    if args.get("die"):
        os.kill(os.getpid(), 9)  # a killed run: no cleanup of streaming's shared memory
    result = {"batches": batches, "state": loader.state_dict()}
    if args.get("resume_local"):  # resume the saved position on a new dataset object
        again = build_loader(local=args["resume_local"], batch_size=args["batch_size"],
                             transform=lambda x: {"hw": tuple(x.shape)},
                             collate_fn=lambda s: [x["key"] for x in s],
                             num_workers=args["workers"], shuffle=args["shuffle"], seed=0,
                             drop_last=args["drop_last"], clean_stale_shm=False)
        again.load_state_dict(result["state"])
        result["resumed"] = list(again)
        result["resumed_state"] = again.state_dict()
    print("RESULT" + json.dumps(result))
""")


def index_of(key: str) -> int:
    """'t10k-images-idx3-ubyte.gz[17]' -> 17."""
    return int(key.rsplit("[", 1)[1].rstrip("]"))


def keys_transform(x: torch.Tensor) -> dict:
    return {"hw": tuple(x.shape)}


def keys_collate(samples: list[dict]) -> list[str]:
    return [s["key"] for s in samples]


def ids(batches: list[list[str]]) -> list[list[int]]:
    return [[index_of(k) for k in b] for b in batches]


@pytest.fixture(scope="module")
def fmnist100(tmp_path_factory) -> Path:
    """The first 100 Fashion-MNIST test images as MDS (real data, 28x28 PNG)."""
    out = tmp_path_factory.mktemp("fm") / "mds"
    convert_to_mds(FMNIST_TEST, out, limit=100, progress=False)
    return out


def fresh_copy(src: Path, tmp_path: Path, name: str) -> str:
    """A private copy: streaming needs a distinct `local` for each live dataset."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def run_child(args: dict, env_extra: dict | None = None, timeout: int = 120) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if env_extra is None or k not in env_extra:
            env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def loader(local, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle", False)
    kw.setdefault("num_workers", 0)
    kw.setdefault("drop_last", True)
    return build_loader(local=str(local), transform=kw.pop("transform", keys_transform),
                        collate_fn=kw.pop("collate_fn", keys_collate), clean_stale_shm=False, **kw)


def test_resume_in_fresh_process_sees_every_sample_once(fmnist100, tmp_path):
    """The required case; the fresh process also starts after a killed run left stale shared
    memory for the same local directory (cleaned on local rank 0 by build_loader)."""
    local = fresh_copy(fmnist100, tmp_path, "a")
    ld = loader(local, num_workers=2)
    assert len(ld) == 25
    first = []
    for batch in ld:
        first.append(batch)
        if len(first) == 5:
            break
    state = ld.state_dict()
    assert state["epoch"] == 0 and state["sample_in_epoch"] == 20
    assert ids(first) == [[4 * b + i for i in range(4)] for b in range(5)]
    json.dumps(state)  # checkpoint-able

    args = {"local": fresh_copy(fmnist100, tmp_path, "b"), "batch_size": 4, "workers": 2,
            "shuffle": False, "drop_last": True}
    killed = subprocess.run([sys.executable, "-c", CHILD,
                             json.dumps({**args, "num_batches": 2, "die": True})],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -9
    res = run_child({**args, "num_batches": -1, "state": state, "clean": True})
    rest = ids(res["batches"])
    assert rest[0] == [20, 21, 22, 23] and len(rest) == 20
    seen = [i for b in ids(first) + rest for i in b]
    assert sorted(seen) == list(range(100))  # every sample exactly once across both runs
    assert res["state"]["epoch"] == 1 and res["state"]["sample_in_epoch"] == 0


def test_position_at_epoch_end_starts_next_epoch_at_zero(fmnist100, tmp_path):
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"), num_workers=2)
    n = 0
    for _ in ld:
        n += 1
        if n == 25:  # stop right after the last batch, before the iterator ends by itself
            break
    state = ld.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
    nxt = next(iter(ld))
    assert ids([nxt]) == [[0, 1, 2, 3]]
    assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["sample_in_epoch"] == 4

    # a raw end-of-epoch position from elsewhere is normalised the same way
    other = loader(fresh_copy(fmnist100, tmp_path, "b"))
    other.load_state_dict({**state, "epoch": 0, "sample_in_epoch": 100})
    assert (other.epoch, other.sample_in_epoch) == (1, 0)
    assert ids([next(iter(other))]) == [[0, 1, 2, 3]]


def test_state_taken_at_the_last_batch_does_not_skip_an_epoch(fmnist100, tmp_path):
    """A checkpoint right after an epoch's last batch (the iterator still open) saves (epoch + 1, 0)
    and leaves the loader to continue with that epoch, not the one after."""
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"), num_workers=1)
    states = []
    for b in ld:
        states.append(ld.state_dict())
    assert (states[-1]["epoch"], states[-1]["sample_in_epoch"]) == (1, 0)
    assert (ld.epoch, ld.sample_in_epoch) == (1, 0)  # the iterator's own end moved it once, not twice
    next(iter(ld))
    assert (ld.state_dict()["epoch"], ld.state_dict()["sample_in_epoch"]) == (1, 4)


def test_drop_last_partial_tail_counts_as_epoch_end(fmnist100, tmp_path):
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"), batch_size=8)  # 100 = 12 x 8 + 4
    assert len(ld) == 12
    batches = list(ld)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert (ld.epoch, ld.sample_in_epoch) == (1, 0)
    ld.load_state_dict({**ld.state_dict(), "epoch": 0, "sample_in_epoch": 96})
    assert (ld.epoch, ld.sample_in_epoch) == (1, 0)  # no full batch left -> next epoch


def run_two_ranks(args: dict) -> list[dict]:
    port = str(find_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
        results.append(json.loads(line[len("RESULT"):]))
    return results


@pytest.mark.dist
def test_two_ranks_position_counts_globally(fmnist100, tmp_path):
    args = {"local": fresh_copy(fmnist100, tmp_path, "a"), "batch_size": 4, "workers": 1,
            "shuffle": False, "drop_last": False, "num_batches": 5,
            "resume_local": fresh_copy(fmnist100, tmp_path, "b")}
    r0, r1 = run_two_ranks(args)
    for r in (r0, r1):
        assert r["state"]["sample_in_epoch"] == 40 and r["state"]["world_size"] == 2
    assert r0["state"] == r1["state"]
    # streaming interleaves the global order over ranks: rank r takes samples r, r + 2, ...
    assert ids(r0["batches"]) == [[8 * b + 2 * i for i in range(4)] for b in range(5)]
    assert ids(r1["batches"]) == [[8 * b + 2 * i + 1 for i in range(4)] for b in range(5)]
    first = ids(r0["batches"]) + ids(r1["batches"])
    rest = ids(r0["resumed"]) + ids(r1["resumed"])
    assert rest[0][0] == 40 and len(rest) == 16  # 60 left = 2 ranks x (7 batches of 4 + 1 of 2)
    seen = [i for b in first + rest for i in b]
    assert sorted(seen) == list(range(100))  # every sample once over 2 ranks x 2 runs
    assert r0["resumed_state"]["epoch"] == 1 and r0["resumed_state"]["sample_in_epoch"] == 0


def test_shuffle_is_seeded_permutation_and_resumes_mid_epoch(fmnist100, tmp_path):
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"), shuffle=True, seed=7)
    epoch0 = [i for b in ids(list(ld)) for i in b]
    epoch1 = [i for b in ids(list(ld)) for i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert epoch0 != list(range(100)) and epoch0 != epoch1

    again = loader(fresh_copy(fmnist100, tmp_path, "b"), shuffle=True, seed=7)
    head = []
    for b in again:
        head.append(b)
        if len(head) == 3:
            break
    state = again.state_dict()
    assert [i for b in ids(head) for i in b] == epoch0[:12]

    resumed = loader(fresh_copy(fmnist100, tmp_path, "c"), shuffle=True, seed=7)
    resumed.load_state_dict(state)
    assert [i for b in ids(list(resumed)) for i in b] == epoch0[12:]

    other = loader(fresh_copy(fmnist100, tmp_path, "d"), shuffle=True, seed=8)
    assert [i for b in ids(list(other)) for i in b] != epoch0


def write_mds_with_bad_samples(out: Path) -> None:
    """12 real-photo JPEG samples written straight with MDSWriter (bypassing conversion checks),
    with sample 5 truncated and sample 11 random bytes: shards damaged after conversion."""
    from streaming import MDSWriter

    import sklearn.datasets

    photo = Image.open(Path(sklearn.datasets.__file__).parent / "images" / "china.jpg")
    with MDSWriter(out=str(out), columns=COLUMNS) as w:
        for i in range(12):
            buf = io.BytesIO()
            photo.crop((40 * i, 0, 40 * i + 160, 160)).resize((32, 32)).save(buf, format="JPEG")
            data = buf.getvalue()
            if i == 5:
                data = data[: len(data) // 2]
            if i == 11:
                data = np.random.default_rng(0).bytes(700)
            w.write({"image": data, "label": i % 3, "key": f"img[{i}]"})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_replaced_counted_and_resume_exactly(tmp_path, num_workers, caplog):
    src = tmp_path / "bad"
    write_mds_with_bad_samples(src)
    ld = loader(fresh_copy(src, tmp_path, "a"), num_workers=num_workers)
    batches = ids(list(ld))
    # slot of 5 -> next good of the worker's stream (6); trailing 11 -> first good sample (0)
    assert batches == [[0, 1, 2, 3], [4, 6, 6, 7], [8, 9, 10, 0]]
    assert ld.num_bad_samples == 2 and sorted(ld.bad_keys) == ["img[11]", "img[5]"]
    assert (ld.epoch, ld.sample_in_epoch) == (1, 0)
    assert sum("undecodable sample img[5]" in r.getMessage() for r in caplog.records) >= 1

    resumed = loader(fresh_copy(src, tmp_path, "b"), num_workers=num_workers)
    resumed.load_state_dict({**ld.state_dict(), "epoch": 0, "sample_in_epoch": 4,
                             "num_bad_samples": 0})
    assert ids(list(resumed)) == batches[1:]
    assert resumed.num_bad_samples == 2


def _photo_tree(root: Path) -> None:
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    for cls, name in (("a", "china.jpg"), ("b", "flower.jpg")):
        photo = Image.open(images / name)
        (root / cls).mkdir(parents=True)
        (root / cls / name).write_bytes((images / name).read_bytes())
        for k in range(3):
            photo.crop((100 * k, 50, 100 * k + 300, 350)).save(root / cls / f"crop{k}.jpg",
                                                              quality=90)


def test_multicrop_collate_real_photos(tmp_path):
    from dvtrain.data.augment import MultiCropAugmentation
    from dvtrain.data.collate import collate_multicrop

    _photo_tree(tmp_path / "src")
    convert_to_mds(tmp_path / "src", tmp_path / "mds", progress=False)
    torch.manual_seed(0)
    ld = loader(tmp_path / "mds", batch_size=4, num_workers=2, shuffle=True,
                transform=MultiCropAugmentation(global_size=64, local_size=32, num_local_crops=3),
                collate_fn=functools.partial(collate_multicrop, n_tokens=16))
    batches = list(ld)
    assert len(batches) == 2
    b = batches[0]
    assert b["collated_global_crops"].shape == (8, 3, 64, 64)
    assert b["collated_local_crops"].shape == (12, 3, 32, 32)
    assert b["collated_masks"].shape == (8, 16) and b["collated_masks"].dtype == torch.bool
    labels = torch.cat([x["labels"] for x in batches]).sort().values
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # crops are normalised real photos, not constant images
    assert b["collated_global_crops"].std() > 0.3
    assert ld.dataloader.pin_memory is False  # no CUDA here


def threads_transform(x: torch.Tensor) -> dict:
    return {"threads": torch.get_num_threads(), "worker": torch.utils.data.get_worker_info().id}


def test_workers_use_one_torch_thread(fmnist100, tmp_path):
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"), num_workers=2, transform=threads_transform,
                collate_fn=lambda s: [(x["threads"], x["worker"]) for x in s])
    got = [t for b in ld for t in b]
    assert {t for t, _ in got} == {1}
    assert {w for _, w in got} == {0, 1}


def test_state_validation_and_missing_dataset(fmnist100, tmp_path):
    ld = loader(fresh_copy(fmnist100, tmp_path, "a"))
    state = ld.state_dict()
    with pytest.raises(ValueError, match="epoch of 99 samples"):
        ld.load_state_dict({**state, "epoch_size": 99})
    with pytest.raises(ValueError, match="missing"):
        ld.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="no index.json"):
        loader(tmp_path)
