"""Augmentation and in-memory batch loading of the training data (:mod:`mmr_ext.train.data`
loads the data sets)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["random_crop_flip", "BatchLoader", "make_loader"]


def random_crop_flip(x: torch.Tensor, *, padding: int = 4, flip: bool = True,
                     padding_mode: str = "constant",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop and horizontal flip of a batch [B, C, H, W], as in the papers' CIFAR-10 setup.

    Each image is padded by ``padding`` pixels on every side (``padding_mode='constant'``:
    zeros, the default and the papers' choice; or ``'reflect'``), a window of the original size
    is cut at a uniformly random offset, and with probability 1/2 (if ``flip``) it is mirrored
    left-right. The random numbers are drawn from ``generator`` on its own device (default:
    torch's global CPU generator), so a seeded CPU generator gives the same crops and flips
    whatever device ``x`` lives on.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if padding_mode not in ("constant", "reflect"):
        raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {padding_mode!r}")
    b, _, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} needs images larger than {padding} pixels")
    if b == 0:
        return x.clone()
    gdev = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev)
    if flip:
        flipped = torch.rand(b, generator=generator, device=gdev) < 0.5
    else:
        flipped = torch.zeros(b, dtype=torch.bool, device=gdev)
    dy, dx, flipped = dy.to(x.device), dx.to(x.device), flipped.to(x.device)

    padded = F.pad(x, (padding,) * 4, mode=padding_mode) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h                                            # [B, H]
    cols = dx[:, None] + torch.where(flipped[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    padded_w = w + 2 * padding
    # flat index into each padded plane; gather once over the flattened spatial dims
    index = (rows[:, :, None] * padded_w + cols[:, None, :]).reshape(b, 1, h * w)
    flat = padded.reshape(b, padded.shape[1], -1)
    out = flat.gather(2, index.expand(b, flat.shape[1], h * w))
    return out.reshape(x.shape)


class BatchLoader:
    """Iterates over an in-memory dataset in mini-batches of ``(images, labels)``.

    Much faster than ``DataLoader`` for tensors already in memory. ``shuffle`` reorders the
    samples each epoch and ``augment`` applies :func:`random_crop_flip`; both draw from
    ``generator``, so a seeded generator makes the whole stream reproducible (and its state can
    be saved with a checkpoint). ``device`` moves each batch before augmentation.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int = 128, *, shuffle: bool = False,
                 augment: bool = False, drop_last: bool = False,
                 generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tensors = getattr(dataset, "tensors", None)
        if tensors is None or len(tensors) != 2:
            raise TypeError("dataset must be a TensorDataset of (images, labels)")
        self.images, self.labels = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = generator
        self.device = None if device is None else torch.device(device)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = self.images.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            if order is None:
                x, y = self.images[sl], self.labels[sl]
            else:
                idx = order[sl]
                x, y = self.images[idx], self.labels[idx]
            if self.device is not None:
                x, y = x.to(self.device), y.to(self.device)
            if self.augment:
                x = random_crop_flip(x, generator=self.generator)
            yield x, y


def make_loader(dataset: TensorDataset, batch_size: int = 128, *, shuffle: bool = False,
                augment: bool = False, drop_last: bool = False, seed: Optional[int] = None,
                device: Optional[Union[str, torch.device]] = None) -> BatchLoader:
    """A :class:`BatchLoader` over ``dataset``; ``seed`` seeds its own generator (``None``:
    draw from torch's global generator)."""
    gen = None
    if seed is not None:
        gen = torch.Generator()
        gen.manual_seed(int(seed))
    return BatchLoader(dataset, batch_size, shuffle=shuffle, augment=augment,
                       drop_last=drop_last, generator=gen, device=device)
