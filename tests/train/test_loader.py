"""Tests of mmr_ext.train.loader: augmentation (random crops and flips) and the batch loader."""
import pytest
import torch

from mmr_ext.train.loader import BatchLoader, make_loader, random_crop_flip


# ------------------------------------------------------------------------------------------
# augmentation

def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _asymmetric_batch(b=64, c=3, h=8, w=8):
    base = torch.linspace(0.05, 1.0, c * h * w).reshape(1, c, h, w)
    return base.repeat(b, 1, 1, 1) * torch.linspace(0.5, 1.0, b).reshape(b, 1, 1, 1)


def _matches_crop(out, x, pad, allow_flip, mode="constant"):
    """Offsets (dy, dx, flipped) for which `out` is a crop of the padded `x`, or None."""
    padded = torch.nn.functional.pad(x[None], (pad,) * 4, mode=mode)[0]
    h, w = x.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(out, crop):
                return dy, dx, False
            if allow_flip and torch.equal(out, crop.flip(-1)):
                return dy, dx, True
    return None


def test_augment_shape_range_determinism():
    x = torch.rand(32, 3, 32, 32, generator=_gen(0))
    a = random_crop_flip(x, generator=_gen(1))
    b = random_crop_flip(x, generator=_gen(1))
    c = random_crop_flip(x, generator=_gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= x.max()
    assert (a == 0).any()  # zero padding shows up somewhere
    x64 = x.double()
    assert random_crop_flip(x64, generator=_gen(1)).dtype == torch.float64


def test_augment_uses_only_given_generator():
    x = torch.rand(8, 1, 6, 6)
    state = torch.get_rng_state()
    random_crop_flip(x, generator=_gen(5))
    assert torch.equal(state, torch.get_rng_state())


def test_augment_flips_happen():
    x = _asymmetric_batch()
    out = random_crop_flip(x, padding=0, generator=_gen(3))
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 10 < sum(flipped) < 54
    assert torch.equal(random_crop_flip(x, padding=0, flip=False, generator=_gen(3)), x)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_augment_crops_match_reference(mode):
    x = _asymmetric_batch(b=48)
    out = random_crop_flip(x, padding=2, padding_mode=mode, generator=_gen(4))
    found = [_matches_crop(o, xi, 2, True, mode) for o, xi in zip(out, x)]
    assert all(f is not None for f in found)
    offsets = {(dy, dx) for dy, dx, _ in found}
    assert len(offsets) >= 10  # of 25 possible
    assert any(f[2] for f in found) and not all(f[2] for f in found)
    if mode == "reflect":
        assert out.min() > 0
    else:
        assert (out == 0).any()


def test_augment_validation():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop_flip(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="padding must be"):
        random_crop_flip(torch.zeros(1, 1, 8, 8), padding=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        random_crop_flip(torch.zeros(1, 1, 8, 8), padding_mode="edge")
    assert random_crop_flip(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)


# ------------------------------------------------------------------------------------------
# batch loader

def _toy_dataset(n=50):
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return torch.utils.data.TensorDataset(x, torch.arange(n))


def test_loader_covers_epoch_and_is_seeded():
    ds = _toy_dataset()
    loader = make_loader(ds, 16, shuffle=True, seed=7)
    assert len(loader) == 4
    ys = torch.cat([y for _, y in loader])
    assert sorted(ys.tolist()) == list(range(50)) and ys.tolist() != list(range(50))
    again = torch.cat([y for _, y in make_loader(ds, 16, shuffle=True, seed=7)])
    assert torch.equal(ys, again)
    second_epoch = torch.cat([y for _, y in loader])
    assert not torch.equal(ys, second_epoch)
    for x, y in make_loader(ds, 16):
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # images stay paired with labels
    assert len(make_loader(ds, 16, drop_last=True)) == 3
    assert [len(y) for _, y in make_loader(ds, 16, drop_last=True)] == [16, 16, 16]


def test_loader_augments():
    ds = torch.utils.data.TensorDataset(_asymmetric_batch(20), torch.zeros(20, dtype=torch.long))
    x_aug = torch.cat([x for x, _ in make_loader(ds, 8, augment=True, seed=0)])
    assert x_aug.shape == (20, 3, 8, 8) and not torch.equal(x_aug, ds.tensors[0])
    x_plain = torch.cat([x for x, _ in make_loader(ds, 8)])
    assert torch.equal(x_plain, ds.tensors[0])


def test_loader_validation():
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(_toy_dataset(), 0)
    with pytest.raises(TypeError, match="TensorDataset"):
        BatchLoader([1, 2, 3], 2)
