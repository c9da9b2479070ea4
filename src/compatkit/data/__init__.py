"""Datasets as uint8 arrays, split scenarios, tensor augmentations, samplers and the cache.

Importing this package registers every dataset loader in ``DATASETS``.
"""

from compatkit.data import cifar, idx, imagefolder, omniglot, synthetic  # noqa: F401 (register)
from compatkit.data.augment import Augmenter, normalize, random_crop, random_flip
from compatkit.data.base import (
    DATASETS,
    DatasetSource,
    DatasetSplits,
    ImageDataset,
    dataset_mean_std,
    list_datasets,
)
from compatkit.data.loading import load_dataset, resize_images
from compatkit.data.sampler import EpochSampler, sequential_batches
from compatkit.data.splits import (
    SCENARIOS,
    Holdout,
    Split,
    class_holdout_split,
    make_split,
    write_manifest,
)

__all__ = [
    "DATASETS",
    "SCENARIOS",
    "Augmenter",
    "DatasetSource",
    "DatasetSplits",
    "EpochSampler",
    "Holdout",
    "ImageDataset",
    "Split",
    "class_holdout_split",
    "dataset_mean_std",
    "list_datasets",
    "load_dataset",
    "make_split",
    "normalize",
    "random_crop",
    "random_flip",
    "resize_images",
    "sequential_batches",
    "write_manifest",
]
