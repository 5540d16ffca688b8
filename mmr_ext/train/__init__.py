"""Training loop of the MMR papers: plain, MMR-lp, MMR-Universal, adversarial training, MMR+AT.

Use :func:`train` with a :class:`TrainConfig` (``mmr-ext train`` builds one from its options).

Modes
    ``plain``      cross-entropy.
    ``mmr``        MMR-lp of the MMR paper (Croce, Andriushchenko & Hein, AISTATS 2019): CE + λ kMMR-lp, p in {1, 2, inf}, k_D = K (all classes).
    ``universal``  MMR-Universal (Croce & Hein, ICLR 2020): CE + MMR-Universal (l1 and l∞ terms).
    ``at``         PGD adversarial training in l1, l2, l∞ (``at_norm``), or ``max``: per sample the
                   strongest of the three PGD examples (Tramèr & Boneh 2019, the AT-(l1, l2, l∞) of
                   the MMR-Universal paper). A single norm trains on 50% clean / 50% adversarial points
                   (MMR paper),
                   ``max`` on adversarial points only (Croce & Hein, ICLR 2020); see ``at_clean_fraction``.
    ``mmr+at``     MMR-lp objective evaluated on the AT batch (clean + adversarial points);
                   ``at_norm`` defaults to p (Croce & Hein, ICLR 2020, App. C.5 also mixes p != q).

Schedules (:mod:`mmr_ext.train.schedules`): k_B decreases linearly 20% → 5% of the hidden units
(universal) or 10% → 2% (mmr), λ warms up linearly from λ/10 to λ over the first 10% of the epochs
(the papers' 10 of 100), the learning rate is divided by 10 for the last 10% of the epochs. Adam,
batch 128, 100 epochs; per-dataset λ, γ, learning rates and target εp as in the papers
(:data:`DATASET_DEFAULTS`).

Presets: ``paper`` is the setting above; ``demo`` (the default on the bundled ``mnist5k``) is a
short run of the same recipe sized for a few CPU minutes (:data:`PRESETS`). Explicit options
override the preset.

Distributed: run the same command under ``torchrun --nproc_per_node N``. Each global batch of the
single-process run is split across the ranks (rank r takes samples r, r + N, ... of it: the
sharding of ``DistributedSampler`` without padding), every rank computes its share of the *global*
mean loss, and the gradients are summed by ``DistributedDataParallel``. Because the regularizers
read the model's layers directly rather than calling ``model.forward``, DDP wraps a small module
whose ``forward`` computes the whole objective: DDP's reducer is armed by that forward and
all-reduces every parameter gradient during ``backward`` as usual. The result equals single-process
training with the same global batch up to floating-point summation order. Evaluation,
certificates and checkpoints run on rank 0. PGD random starts are drawn per rank, so AT runs are
reproducible for a fixed number of processes but differ from single-process ones.

Reproducibility: everything random draws from seeded generators (model init from ``seed``, the
data order and augmentation from a loader generator, PGD starts from an attack generator), all of
which are saved in the per-epoch checkpoint; ``resume`` continues a run exactly (bit-identical
weights on CPU with the same thread count).

Modules: :mod:`~mmr_ext.train.config` (options, presets, the per-data-set table),
:mod:`~mmr_ext.train.loop` (the loop), :mod:`~mmr_ext.train.objective` (the loss of each mode, the AT
batch), :mod:`~mmr_ext.train.distributed` (``torchrun`` setup, per-rank RNG states),
:mod:`~mmr_ext.train.reporting` (metrics, curves, summary), :mod:`~mmr_ext.train.schedules`,
:mod:`~mmr_ext.train.checkpoint`, :mod:`~mmr_ext.train.data` (data sets) and
:mod:`~mmr_ext.train.loader` (augmentation, batches).
"""
from .checkpoint import (CheckpointError, build_from_checkpoint, load_checkpoint, load_model,
                         save_checkpoint)
from .config import (AT_NORMS, DATASET_DEFAULTS, MODES, PAPER_EPS, PRESETS, ConfigError, TrainConfig,
                     config_dict, parse_eps_triple, resolve_config)
from .data import DATASETS, DatasetInfo, ImageDataset, dataset_info, load_dataset
from .loader import BatchLoader, make_loader, random_crop_flip
from .loop import TrainResult, train
from .reporting import certified_stats, clean_error, format_summary
from .schedules import Schedule

__all__ = ["TrainConfig", "ConfigError", "TrainResult", "train", "resolve_config", "format_summary",
           "MODES", "AT_NORMS", "PRESETS", "DATASET_DEFAULTS", "PAPER_EPS", "parse_eps_triple", "config_dict",
           "certified_stats", "clean_error", "Schedule", "CheckpointError", "save_checkpoint",
           "load_checkpoint", "load_model", "build_from_checkpoint", "DATASETS", "DatasetInfo", "ImageDataset",
           "dataset_info", "load_dataset", "BatchLoader", "make_loader", "random_crop_flip"]
