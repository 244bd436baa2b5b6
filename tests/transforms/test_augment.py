"""augment_batch (random-resized square crop, flips, rot90) and center_resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sarjepa_dist.transforms import augment_batch, center_resize, crop_views


def chips(b: int = 6, c: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b, 1, h, w), generator=g) * 100
    return torch.cat([x * (k + 1) for k in range(c)], dim=1)  # channel k = (k+1) x channel 0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dihedral(img: torch.Tensor, flips: bool, rot90: bool) -> list[torch.Tensor]:
    flipped = [img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2)] if flips else [img]
    ks = range(4) if rot90 else range(1)
    return [torch.rot90(f, k, dims=(-2, -1)) for f in flipped for k in ks]


def test_shapes_dtype_and_determinism():
    x = chips(h=80, w=72)
    a = augment_batch(x, 32, (0.3, 1.0), True, True, gen(1))
    b = augment_batch(x, 32, (0.3, 1.0), True, True, gen(1))
    c = augment_batch(x, 32, (0.3, 1.0), True, True, gen(2))
    assert a.shape == (6, 2, 32, 32) and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # all channels of a sample share the geometry (channel 1 is exactly 2 x channel 0)
    torch.testing.assert_close(a[:, 1], 2 * a[:, 0])
    # bilinear weights are non-negative: amplitudes stay >= 0
    assert a.min().item() >= 0


def test_generator_consumption_is_independent_of_flags():
    x = chips()
    g1, g2 = gen(3), gen(3)
    augment_batch(x, 32, (0.5, 1.0), True, True, g1)
    augment_batch(x, 32, (0.5, 1.0), False, False, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    # crops are the same with flips/rotations off; the flagged output is a dihedral image of it
    plain = augment_batch(x, 32, (0.5, 1.0), False, False, gen(4))
    full = augment_batch(x, 32, (0.5, 1.0), True, True, gen(4))
    for i in range(len(x)):
        assert any(torch.equal(full[i], d) for d in dihedral(plain[i], True, True))


def test_no_crop_no_flip_same_size_is_identity():
    x = chips()
    assert torch.equal(augment_batch(x, 64, (1.0, 1.0), False, False, gen(5)), x)


@pytest.mark.parametrize("flips,rot90", [(True, False), (False, True), (True, True)])
def test_flips_and_rotations_are_dihedral_images(flips, rot90):
    x = chips(b=24, c=1)
    out = augment_batch(x, 64, (1.0, 1.0), flips, rot90, gen(6))
    seen = set()
    for i in range(len(x)):
        images = dihedral(x[i], flips, rot90)
        hits = [j for j, d in enumerate(images) if torch.equal(out[i], d)]
        assert hits, f"sample {i} is not a flip/rotation of its input"
        seen.add(hits[0])
    assert len(seen) >= 3  # with 24 samples more than one transform occurs (fixed seed)


def test_horizontal_flips_only_keep_the_range_axis():
    x = chips(b=24, c=1)
    out = augment_batch(x, 64, (1.0, 1.0), True, False, gen(6), vertical_flips=False)
    kinds = []
    for i in range(len(x)):
        if torch.equal(out[i], x[i]):
            kinds.append("identity")
        elif torch.equal(out[i], x[i].flip(-1)):
            kinds.append("hflip")
        else:
            raise AssertionError(f"sample {i} is neither its input nor its horizontal mirror")
    assert set(kinds) == {"identity", "hflip"}
    # the same draws with vertical flips allowed give some vertical flips: the flag is what stops them
    both = augment_batch(x, 64, (1.0, 1.0), True, False, gen(6))
    assert any(torch.equal(both[i], x[i].flip(-2)) or torch.equal(both[i], x[i].flip(-1).flip(-2))
               for i in range(len(x)))


def test_crop_is_a_window_of_the_input():
    x = chips(b=8, c=1)
    side = 32  # area fraction 0.25 of 64 x 64 -> 32 x 32, already out_size: no resize
    out = augment_batch(x, side, (0.25, 0.25), False, False, gen(7))
    offsets = set()
    for i in range(len(x)):
        wins = x[i, 0].unfold(0, side, 1).unfold(1, side, 1)  # (33, 33, side, side)
        match = (wins == out[i, 0]).flatten(2).all(-1).nonzero()
        assert len(match) == 1, f"sample {i}: crop not found in the input"
        offsets.add(tuple(match[0].tolist()))
    assert len(offsets) > 1  # positions are random


def test_crop_scale_sets_the_crop_area():
    # a chip whose value is its column index: a crop resized to out_size spans (side - 1) columns
    cols = torch.arange(100, dtype=torch.float32).expand(1, 1, 100, 100).repeat(16, 1, 1, 1)
    out = augment_batch(cols, 100, (0.36, 0.36), False, False, gen(8))  # side 60, upsampled
    span = out[:, 0, 50].amax(-1) - out[:, 0, 50].amin(-1)
    assert ((span > 55) & (span < 60)).all()


def test_resize_downsamples_with_antialias():
    x = chips(b=2, c=1, h=96, w=96)
    out = augment_batch(x, 48, (1.0, 1.0), False, False, gen(9))
    ref = F.interpolate(x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, ref)


def test_global_rng_and_integer_input():
    torch.manual_seed(0)
    a = augment_batch(chips().to(torch.uint8), 16)
    torch.manual_seed(0)
    b = augment_batch(chips().to(torch.uint8), 16)
    assert a.dtype == torch.float32 and a.shape == (6, 2, 16, 16)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(crop_scale=(0.0, 1.0)), dict(crop_scale=(0.8, 0.5)),
                                    dict(crop_scale=(0.5, 1.5)), dict(out_size=0)])
def test_bad_arguments(kwargs):
    args = dict(x=chips(), out_size=16) | kwargs
    with pytest.raises(ValueError):
        augment_batch(**args)


def test_center_resize():
    x = chips(b=2, c=1, h=64, w=96)
    # centre square: columns 16..79
    out = center_resize(x, 64)
    assert torch.equal(out, x[..., 16:80])
    small = center_resize(x, 32)
    ref = F.interpolate(x[..., 16:80], size=(32, 32), mode="bilinear", antialias=True,
                        align_corners=False)
    torch.testing.assert_close(small, ref)
    tall = chips(b=1, c=1, h=101, w=64)
    assert torch.equal(center_resize(tall, 64), tall[..., 18:82, :])
    square = chips(b=1, c=1, h=40, w=40)
    assert center_resize(square, 40) is square
    with pytest.raises(ValueError):
        center_resize(square, 0)


def test_crop_views_are_the_centre_view_then_centre_and_corner_crops():
    x = torch.arange(2 * 1 * 16 * 20, dtype=torch.float32).reshape(2, 1, 16, 20)
    views = crop_views(x, 16, fraction=0.75)
    assert len(views) == 6 and all(v.shape == (2, 1, 16, 16) for v in views)
    square = x[..., :, 2:18]  # the 16x16 centre square center_resize keeps
    torch.testing.assert_close(views[0], center_resize(x, 16))
    crops = [square[..., 2:14, 2:14], square[..., :12, :12], square[..., :12, 4:], square[..., 4:, :12],
             square[..., 4:, 4:]]
    for view, crop in zip(views[1:], crops):
        torch.testing.assert_close(view, center_resize(crop.contiguous(), 16))
    with pytest.raises(ValueError, match="fraction"):
        crop_views(x, 16, fraction=0.0)
