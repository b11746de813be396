"""Streaming multi-crop data loader with exact mid-epoch resume.

Pipeline: MDS shards (``dvtrain data convert``) -> ``StreamingDataset`` (local dir, or remote URL +
local cache; shuffled with a seed; partitioned over nodes/ranks/workers by streaming itself) ->
decode (``dvtrain.data.images.decode_image``) + transform (multi-crop) inside DataLoader workers, one
torch thread each -> ``collate_fn`` (``dvtrain.data.collate.collate_multicrop``) -> pinned batches
when training on CUDA.

Legend: B = per-rank batch size, W = world size (ranks). One global step consumes B * W samples.

Position accounting (what ``MultiCropLoader.state_dict`` saves): ``epoch`` and ``sample_in_epoch``,
the number of samples of that epoch consumed by all ranks together, in streaming's global sample
order = (position at the start of this iterator) + (batches yielded) * B * W. It is computed here,
not by ``StreamingDataLoader``, whose batch-size guess (length of the first element of a batch)
is wrong for multi-crop batches. A position at the end of an epoch is stored as (epoch + 1, 0).

Undecodable samples: each item a worker reads is decoded; a sample that fails is skipped, logged
and counted, and its batch slot is filled with the next decodable sample of that worker's stream
(augmented afresh; failures at the very end of a worker's stream use the first decodable sample of
the dataset). Every sample id still fills exactly one batch slot, so the position above
stays exact and resuming gives the same samples as an uninterrupted run.

Augmentation and masking randomness is a function of the position, not of a worker's history:
each sample is augmented under torch's global RNG seeded with ``sample_seed(seed, epoch,
sample_id)`` (inside ``torch.random.fork_rng``, so the caller's RNG is untouched), and each batch is
collated (block masks) under a seed derived from its samples' seeds. A restored position therefore
reproduces the crops and masks of an uninterrupted run bit for bit, with any number of workers;
no worker RNG state needs to be saved. A slot refilled after an undecodable sample draws with the
seed of the slot's own sample id.

Reference: ``dinov2/data/loaders.py`` (``make_data_loader`` with an infinite sampler; no mid-epoch
resume there) - replaced by streaming's deterministic partitioning and resumption.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from dvtrain.data.images import decode_image  # the one decode (EXIF orientation, 16-bit); re-exported

__all__ = [
    "MultiCropLoader",
    "build_train_loader",
    "MultiCropStreamingDataset",
    "build_loader",
    "clean_stale_shared_memory_once",
    "decode_image",
    "sample_seed",
]

logger = logging.getLogger(__name__)

STATE_KEYS = ("epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed",
              "initial_physical_nodes")
_LOCAL_PREDOWNLOAD = 1 << 40  # "no limit" for local-only datasets

def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """The augmentation seed of one sample: a 63-bit hash of (shuffle seed, epoch, sample id).

    Same sample in another epoch -> other crops; same position after a resume -> same crops.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _call_seeded(seed: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with torch's CPU RNG seeded to ``seed``; the caller's RNG state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


_CLEANED = False


def clean_stale_shared_memory_once() -> None:
    """Remove streaming's shared-memory segments on this machine, once per process, before the
    first dataset is built.

    A killed run leaves its segments behind and the next run would attach to them. streaming's
    ``clean_stale_shared_memory`` cannot tell those from live ones: it unlinks EVERY streaming
    segment of the machine (on local rank 0; other ranks wait at a barrier when torch.distributed
    is initialised). Hence only the first call per process does anything (later calls would break
    this process's own datasets), and two training runs that share a machine must not start at the
    same moment (the second one's cleaning would hit the first one's segments; already attached
    memory stays valid, new attachments do not).
    """
    global _CLEANED
    if _CLEANED:
        return
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    _CLEANED = True


@dataclass(frozen=True)
class _BadSample:
    key: str
    reason: str


class MultiCropStreamingDataset(StreamingDataset):
    """``StreamingDataset`` over dvtrain MDS shards that decodes and transforms in its iterator.

    Items yielded by ``__iter__`` are ``(sample, bad)`` pairs: ``sample`` is the transform's
    output dict plus ``"label"`` (int, -1 when unlabelled) and ``"key"`` (str, source path) - the
    transform's output goes under ``"image"`` when it is not a dict - and ``bad`` is ``None`` or the ``_BadSample`` whose
    slot this sample fills. ``MultiCropLoader``'s collate wrapper strips ``bad``.

    Args:
        local: local directory of the shards (local-only dataset) or the cache for ``remote``.
        remote: object-store URL of the shards (``s3://...``), or None.
        transform: called on a uint8 tensor [3, H, W] (RGB); e.g. ``MultiCropAugmentation``.
        batch_size: B, per-rank batch size (streaming partitions by it; must match the loader).
        shuffle: shuffle sample order (streaming's ``shuffle_algo``; deterministic per seed+epoch).
        seed: shuffle seed.
        num_canonical_nodes: streaming's canonical node count (None -> physical nodes; 64x for
            py1s/py2s). Saved in the loader state; resuming reuses the saved value.
        **streaming_kwargs: passed to ``StreamingDataset`` (``predownload``, ``cache_limit``,
            ``epoch_size``, ``shuffle_algo``, ``shuffle_block_size``, ``download_timeout`` ...).
    """

    def __init__(self, *, local: str, remote: str | None, transform: Callable[[torch.Tensor], Any],
                 batch_size: int, shuffle: bool, seed: int,
                 num_canonical_nodes: int | None = None, **streaming_kwargs: Any) -> None:
        shuffle_algo = streaming_kwargs.pop("shuffle_algo", "py1e")
        if remote is None and streaming_kwargs.get("predownload") is None:
            # Every shard is already local: let streaming's prepare/ready threads run through the
            # epoch once and exit instead of polling 8 x B samples ahead every 7 ms, which costs
            # the decoding thread about half its speed in GIL hand-offs on small images.
            streaming_kwargs["predownload"] = _LOCAL_PREDOWNLOAD
        if num_canonical_nodes is None:
            nodes = _world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            num_canonical_nodes = max(1, nodes) * (64 if shuffle_algo in ("py1s", "py2s") else 1)
        super().__init__(local=local, remote=remote, batch_size=batch_size, shuffle=shuffle,
                         shuffle_seed=seed, shuffle_algo=shuffle_algo,
                         num_canonical_nodes=num_canonical_nodes, **streaming_kwargs)
        self.transform = transform
        self._fallback: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._iter_epoch = 0  # epoch of the running iterator (set in each worker by _resume_incr_epoch)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._iter_epoch = epoch
        return epoch, sample_in_epoch

    def __getitem__(self, at: Any) -> Any:
        raw = super().__getitem__(at)
        if isinstance(at, (int, np.integer)):  # what __iter__ asks for: keep the id for seeding
            raw = dict(raw, _sample_id=int(at))
        return raw

    def _decode(self, raw: dict[str, Any]) -> torch.Tensor:
        return decode_image(raw["image"])

    def _make(self, image: torch.Tensor, raw: dict[str, Any], slot_id: int,
              bad: _BadSample | None) -> tuple[dict, Any]:
        seed = sample_seed(int(self.shuffle_seed), self._iter_epoch, slot_id)
        out = _call_seeded(seed, self.transform, image)
        sample = dict(out) if isinstance(out, dict) else {"image": out}
        sample["label"] = int(raw["label"])
        sample["key"] = str(raw["key"])
        sample["_seed"] = seed
        return sample, bad

    def _first_good_sample(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """First decodable sample of the dataset by sample id (fallback for trailing failures)."""
        if self._fallback is None:
            for sample_id in range(self.num_samples):
                raw = self.get_item(sample_id)
                try:
                    self._fallback = (self._decode(raw), raw)
                    break
                except Exception:  # noqa: BLE001 - keep scanning for a decodable sample
                    continue
            else:
                raise ValueError(f"no sample of the dataset at {self.streams[0].local} decodes; "
                                 f"re-run `dvtrain data convert` to rebuild the shards")
        return self._fallback

    def __iter__(self) -> Iterator[tuple[dict, Any]]:  # type: ignore[override]
        pending: list[tuple[int, _BadSample]] = []
        for raw in super().__iter__():
            slot_id = raw.get("_sample_id", -1)
            try:
                image = self._decode(raw)
            except Exception as e:  # noqa: BLE001 - any decoder failure: skip and count
                bad = _BadSample(str(raw.get("key", "?")), f"{type(e).__name__}: {e}")
                logger.warning("undecodable sample %s skipped (%s)", bad.key, bad.reason)
                pending.append((slot_id, bad))
                continue
            for bad_id, bad in pending:  # fill the skipped slots with this sample, augmented afresh
                yield self._make(image, raw, bad_id, bad)
            pending = []
            yield self._make(image, raw, slot_id, None)
        if pending:
            image, raw = self._first_good_sample()
            for bad_id, bad in pending:
                yield self._make(image, raw, bad_id, bad)


class _CollateDroppingBad:
    """collate_fn wrapper: ([(sample, bad)]) -> (collate_fn([sample]), [bad, ...]).

    The collate function (block masks) runs under a seed derived from the batch's sample seeds, so
    the masks too depend only on the position (see the module docstring).
    """

    def __init__(self, collate_fn: Callable[[list[dict]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[dict, Any]]) -> tuple[Any, list[_BadSample]]:
        samples = [s for s, _ in items]
        seeds = [s.pop("_seed", None) for s in samples]
        digest = hashlib.blake2b(",".join(map(str, seeds)).encode(), digest_size=8).digest()
        batch = _call_seeded(int.from_bytes(digest, "little") & (2**63 - 1), self.collate_fn, samples)
        return batch, [b for _, b in items if b is not None]


def _worker_init(worker_id: int) -> None:
    """One torch thread per DataLoader worker; numpy's global RNG seeded from torch's. Workers ignore
    SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the main process alone
    decides how the run stops (finish the step, checkpoint, shut the workers down)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


class MultiCropLoader:
    """Iterable over batches of a ``MultiCropStreamingDataset`` that knows its exact position.

    ``for batch in loader`` runs from the current position to the end of that epoch; the next
    ``for`` continues with the next epoch. ``state_dict()`` / ``load_state_dict()`` save and restore
    the position (see the module docstring); restore before iterating.

    Attributes:
        dataset: the ``MultiCropStreamingDataset``.
        dataloader: the torch ``DataLoader``; its batches are ``(batch, bad_samples)`` pairs.
        batch_size: B, per rank.
        world_size: W.
        num_bad_samples: undecodable samples skipped so far (all epochs, including before resume).
    """

    def __init__(self, dataset: MultiCropStreamingDataset, dataloader: DataLoader, batch_size: int,
                 drop_last: bool) -> None:
        self.dataset = dataset
        self.dataloader = dataloader
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.world_size = _world_size()
        self.epoch = 0
        self.sample_in_epoch = 0
        self.num_bad_samples = 0
        self.bad_keys: list[str] = []  # first 1000 keys, for reports

    @property
    def epoch_size(self) -> int:
        """Samples per epoch over all ranks (streaming's epoch size)."""
        return int(self.dataset.epoch_size)

    def __len__(self) -> int:
        """Batches per rank in a full epoch."""
        per_rank = -(-self.epoch_size // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _epoch_done(self, sample_in_epoch: int) -> bool:
        remaining = self.epoch_size - sample_in_epoch
        if remaining <= 0:
            return True
        return self.drop_last and -(-remaining // self.world_size) < self.batch_size

    def _normalise(self) -> None:
        if self._epoch_done(self.sample_in_epoch):
            self.epoch += 1
            self.sample_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """The loader position, JSON-serialisable; identical on every rank.

        Returns:
            dict with ``epoch``, ``sample_in_epoch`` (global samples consumed in that epoch),
            ``num_canonical_nodes``, ``shuffle_seed``, ``initial_physical_nodes`` (streaming's
            resumption fields), ``epoch_size``, ``batch_size``, ``world_size``, ``num_bad_samples``.
        """
        # Normalise a copy: this runs while an epoch's iterator may still be open (a checkpoint right
        # after its last batch), and that iterator advances ``epoch`` itself when it ends.
        epoch, sample_in_epoch = self.epoch, self.sample_in_epoch
        if self._epoch_done(sample_in_epoch):
            epoch, sample_in_epoch = epoch + 1, 0
        nodes = self.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        initial = self.dataset.initial_physical_nodes
        return {
            "epoch": epoch,
            "sample_in_epoch": sample_in_epoch,
            "num_canonical_nodes": int(self.dataset.num_canonical_nodes),
            "shuffle_seed": int(self.dataset.shuffle_seed),
            "initial_physical_nodes": int(initial) if initial is not None else max(1, nodes),
            "epoch_size": self.epoch_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_bad_samples": self.num_bad_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict`` (any world size / batch size).

        Args:
            state: the dict from ``state_dict``.

        Raises:
            ValueError: missing keys, or the dataset's epoch size differs from the saved one (the
                shards changed since the checkpoint).
        """
        missing = [k for k in STATE_KEYS + ("epoch_size",) if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; expected the dict saved by "
                             f"MultiCropLoader.state_dict()")
        if int(state["epoch_size"]) != self.epoch_size:
            raise ValueError(f"loader state was saved for an epoch of {state['epoch_size']} samples "
                             f"but this dataset has {self.epoch_size}; the shards changed since "
                             f"the checkpoint")
        self.epoch = int(state["epoch"])
        self.sample_in_epoch = int(state["sample_in_epoch"])
        self.num_bad_samples = int(state.get("num_bad_samples", 0))
        self.dataset.num_canonical_nodes = int(state["num_canonical_nodes"])
        self.dataset.shuffle_seed = int(state["shuffle_seed"])
        self.dataset.initial_physical_nodes = state["initial_physical_nodes"]
        self._normalise()

    def _push_position(self) -> None:
        """Hand the position to streaming's workers (shared memory) before they start the epoch."""
        self.dataset.next_epoch = self.epoch  # an abandoned iterator must not advance the epoch
        state = {k: v for k, v in self.state_dict().items() if k in STATE_KEYS}
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        self._normalise()
        self._push_position()
        step = self.batch_size * self.world_size
        for batch, bad in self.dataloader:
            self.sample_in_epoch += step
            if bad:
                self.num_bad_samples += len(bad)
                for b in bad:
                    logger.warning("rank %d: undecodable sample %s replaced in its batch (%s)",
                                   _rank(), b.key, b.reason)
                    if len(self.bad_keys) < 1000:
                        self.bad_keys.append(b.key)
            yield batch
        self.epoch += 1
        self.sample_in_epoch = 0


def _loader_seed(seed: int, rank: int) -> int:
    digest = hashlib.sha256(f"dvtrain-loader:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def build_loader(
    *,
    local: str,
    remote: str | None = None,
    batch_size: int,
    transform: Callable[[torch.Tensor], Any],
    collate_fn: Callable[[list[dict]], Any],
    num_workers: int = 8,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = True,
    clean_stale_shm: bool = True,
    **streaming_kwargs: Any,
) -> MultiCropLoader:
    """Build the training loader over dvtrain MDS shards.

    Rank/world come from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``) as streaming reads them; initialise torch.distributed first when
    W > 1 (streaming synchronises through it).

    Args:
        local: shard directory (local-only), or the local cache directory when ``remote`` is set.
            Must be unique per concurrently running dataset on a machine.
        remote: object-store URL of the shards (``s3://bucket/prefix``), or None.
        batch_size: B, samples per rank per batch.
        transform: uint8 tensor [3, H, W] -> sample, e.g. ``MultiCropAugmentation(...)``.
        collate_fn: list of B samples -> batch, e.g. ``functools.partial(collate_multicrop,
            n_tokens=..., mask_generator=...)``.
        num_workers: DataLoader worker processes per rank (0 = decode in the main process).
        shuffle: shuffle (streaming's py1e by default; ``seed`` is the shuffle seed).
        seed: shuffle seed; also seeds the workers' augmentation RNG (with the rank).
        drop_last: drop each rank's last partial batch of an epoch.
        pin_memory: None -> pin when CUDA is available (pinned memory only helps CUDA copies).
        prefetch_factor: batches prefetched per worker (ignored when num_workers = 0).
        persistent_workers: keep workers alive between epochs (when num_workers > 0).
        clean_stale_shm: remove shared memory from killed runs first (local rank 0, once per
            process).
        **streaming_kwargs: extra ``StreamingDataset`` arguments (``predownload``, ``cache_limit``,
            ``epoch_size``, ``shuffle_algo``, ``shuffle_block_size``, ``num_canonical_nodes``...).

    Returns:
        MultiCropLoader; iterate it for batches, save ``state_dict()`` in checkpoints.

    Raises:
        ValueError: batch_size < 1, num_workers < 0, or ``local`` has no shards and no ``remote``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if remote is None and not os.path.isfile(os.path.join(local, "index.json")):
        raise ValueError(f"{local} has no index.json: not an MDS dataset. Convert images with "
                         f"`dvtrain data convert SRC {local}` or pass remote=<url>")
    if clean_stale_shm:
        clean_stale_shared_memory_once()
    dataset = MultiCropStreamingDataset(local=local, remote=remote, transform=transform,
                                        batch_size=batch_size, shuffle=shuffle, seed=seed,
                                        **streaming_kwargs)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(_loader_seed(seed, _rank()))
    workers_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        workers_kwargs = {"prefetch_factor": prefetch_factor,
                          "persistent_workers": persistent_workers,
                          "worker_init_fn": _worker_init}
    dataloader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_CollateDroppingBad(collate_fn), pin_memory=pin_memory,
                            drop_last=drop_last, generator=generator, **workers_kwargs)
    return MultiCropLoader(dataset, dataloader, batch_size=batch_size, drop_last=drop_last)


def build_train_loader(recipe: Any, cache_dir: str | None = None) -> MultiCropLoader:
    """The training loader of a recipe: its MDS shards -> multi-crop -> block masks -> collate.

    Args:
        recipe: a :class:`dvtrain.recipe.Recipe` (crops, masking, data, batch, seed).
        cache_dir: local cache for a remote ``data.path`` (default ``data.cache_dir`` or a new
            temporary directory).

    Returns:
        MultiCropLoader over ``recipe.data.path`` with ``batch.micro_batch_per_device`` samples per batch.
    """
    import functools
    import tempfile

    from dvtrain.data.augment import MultiCropAugmentation
    from dvtrain.data.collate import collate_multicrop
    from dvtrain.data.masking import MaskingGenerator
    from dvtrain.data.remote import is_remote

    c, m = recipe.crops, recipe.masking
    grid = c.global_size // recipe.model.patch_size
    mask_generator = MaskingGenerator(
        (grid, grid), max_num_patches=int(0.5 * grid * grid), min_num_patches=m.min_num_patches, min_aspect=m.min_aspect
    )
    collate = functools.partial(
        collate_multicrop, mask_ratio_min_max=tuple(m.ratio_min_max), mask_probability=m.sample_probability,
        n_tokens=grid * grid, mask_generator=mask_generator,
    )
    transform = MultiCropAugmentation(
        c.global_size, c.local_size, c.num_local_crops, global_scale=tuple(c.global_scale),
        local_scale=tuple(c.local_scale), blur=c.blur,
    )
    remote = recipe.data.path if is_remote(recipe.data.path) else None
    local = recipe.data.path if remote is None else (
        cache_dir or recipe.data.cache_dir or tempfile.mkdtemp(prefix="dvtrain-mds-"))
    return build_loader(
        local=local, remote=remote, batch_size=recipe.batch.micro_batch_per_device, transform=transform,
        collate_fn=collate, num_workers=recipe.data.num_workers, shuffle=recipe.data.shuffle, seed=recipe.seed,
        drop_last=True,
    )
