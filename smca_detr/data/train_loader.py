"""Training data loader whose stream is a pure function of (seed, rank, world size, position).

An interrupted run resumed in a new process (``train_net.py --resume``) must draw the same images
with the same augmentations as the uninterrupted run. detectron2's loader does not allow that: its
aspect-ratio grouping keeps images waiting in buckets, its workers prefetch, and its augmentations
use each worker's numpy state, seeded once per worker. Here

* :class:`PositionedBatchSampler` forms the batches in the main process from the indices of the
  training sampler (``TrainingSampler`` / ``RepeatFactorTrainingSampler``, seeded): grouped by the
  dataset's aspect ratio (``width > height``, the buckets of detectron2's
  ``AspectRatioGroupedDataset``) when asked. ``start`` = number of batches already trained: the
  batches before it are formed and dropped (indices only, no image is read), so batch ``k`` is the
  same whether the stream started at 0 or at ``k``.
* Each element of a batch is ``(dataset index, sample seed)``; the seed is derived from the run's
  seed and the element's position in the GLOBAL index stream (position ``j`` of rank ``r`` of
  ``W`` is ``j * W + r``), and :class:`SeededMapDataset` seeds Python's ``random``, numpy and torch
  with it before it maps the element. An element's augmentation therefore depends neither on the
  worker that maps it nor on ``DATALOADER.NUM_WORKERS``.
"""
import logging
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from detectron2.data.common import DatasetFromList

__all__ = ["PositionedBatchSampler", "SeededMapDataset", "build_positioned_train_loader", "derive_seed",
           "seed_all"]

logger = logging.getLogger(__name__)

# domains of derive_seed, so that no two uses of the run's seed share a stream
SAMPLE_DOMAIN = 1
ITERATION_DOMAIN = 2


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integers (numpy ``SeedSequence``: well mixed, and the same on
    every platform and version)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class PositionedBatchSampler:
    """Batches of ``(dataset index, sample seed)`` of one rank (see the module docstring).

    Args:
        sampler: the rank's infinite index stream (detectron2 training samplers shard themselves).
        batch_size: images per batch on this rank.
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        group_ids: per dataset index, its aspect-ratio bucket (None: no grouping).
    """

    def __init__(self, sampler, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 group_ids: Optional[Sequence[int]] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.group_ids = None if group_ids is None else list(group_ids)
        self.start = 0  # batches to drop: the iterations already trained

    def __iter__(self):
        buckets = {}
        position = 0
        for j, index in enumerate(iter(self.sampler)):
            key = 0 if self.group_ids is None else self.group_ids[index]
            bucket = buckets.setdefault(key, [])
            bucket.append((int(index), j * self.world_size + self.rank))
            if len(bucket) < self.batch_size:
                continue
            buckets[key] = []
            if position >= self.start:
                yield [(i, derive_seed(self.seed, SAMPLE_DOMAIN, g)) for i, g in bucket]
            position += 1


class SeededMapDataset(Dataset):
    """``mapper(dataset[index])`` for keys ``(index, seed)``, with the random generators seeded from
    ``seed`` first. When the mapper returns None (an image without boxes and
    INPUT.DETR.KEEP_EMPTY False) another element, drawn from the same seed, is tried."""

    def __init__(self, dataset: List[dict], mapper):
        self.dataset = DatasetFromList(dataset, copy=False)  # serialized: shared by forked workers
        self.mapper = mapper

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        rng = random.Random(seed)
        for attempt in range(100):
            seed_all(derive_seed(seed, attempt))
            data = self.mapper(self.dataset[index])
            if data is not None:
                return data
            index = rng.randrange(len(self.dataset))
            if attempt >= 2:
                logger.warning(f"Mapping dataset element {key[0]} failed; retry {attempt + 1} with element {index}")
        raise RuntimeError(f"The dataset mapper returned None for 100 elements in a row (from element {key[0]}): "
                           "does any training image have annotations (INPUT.DETR.KEEP_EMPTY False)?")


def _collate(batch):
    return batch


def build_positioned_train_loader(dataset: List[dict], mapper, sampler, *, batch_size: int, seed: int,
                                  rank: int, world_size: int, aspect_ratio_grouping: bool, num_workers: int):
    """A ``DataLoader`` over :class:`SeededMapDataset` with a :class:`PositionedBatchSampler` (its
    ``positioned_batch_sampler`` attribute: set ``.start`` before iterating to continue a run)."""
    group_ids = None
    if aspect_ratio_grouping:
        if all("width" in d and "height" in d for d in dataset):
            group_ids = [0 if d["width"] > d["height"] else 1 for d in dataset]
        else:
            logger.warning("Some training dataset dicts have no 'width'/'height': batches are not grouped "
                           "by aspect ratio.")
    batch_sampler = PositionedBatchSampler(sampler, batch_size, seed, rank, world_size, group_ids)
    loader = DataLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        # the loader draws its workers' base seed from this generator, not from torch's global one
        generator=torch.Generator().manual_seed(seed % 2 ** 63),
    )
    loader.positioned_batch_sampler = batch_sampler
    return loader
