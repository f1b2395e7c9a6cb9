"""Data: Fashion-MNIST, CIFAR-10 (binary, image folder or tarball) and generic image folders,
decoded once into cached uint8 tensors; per-image batch augmentation and normalisation.

See ``normlab.data.loader`` for sources, splits and the cache, ``normlab.data.images`` for how
folder images are decoded and resized.
"""

from normlab.data.augment import augment_batch, normalize
from normlab.data.augmentations import apply_augment
from normlab.data.bundle import DataBundle
from normlab.data.loader import cache_dir, load_data

__all__ = ["DataBundle", "apply_augment", "augment_batch", "cache_dir", "load_data", "normalize"]
