"""The DALI two-view loader in CPU mode (``device_id=None``) on a few real Imagenette JPEGs."""

import itertools
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

pytestmark = pytest.mark.extras
pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from fastbeit.data.dali import (  # noqa: E402
    DaliPretrainLoader,
    _dali_decodes,
    block_mask_fn,
    dali_available,
    sample_dali_crop_boxes,
)
from fastbeit.data.transforms import sample_crop_box  # noqa: E402
from fastbeit.errors import UserError  # noqa: E402
from fastbeit.masking import MaskingGenerator  # noqa: E402

N_IMAGES = 24


def _pick_images(train_dir, n_rgb, n_grey):
    """The first ``n_grey`` greyscale and an even spread of ``n_rgb`` colour JPEGs."""
    files = sorted(train_dir.glob("*/*.JPEG"))
    grey = []
    for f in files:
        with Image.open(f) as img:
            if img.mode == "L":
                grey.append(f)
        if len(grey) == n_grey:
            break
    colour = [f for f in files[:: len(files) // (2 * n_rgb)] if f not in grey][:n_rgb]
    return colour, grey


@pytest.fixture(scope="module")
def image_dir(shared_data, tmp_path_factory):
    """A flat folder of 24 real JPEGs, two of them greyscale (mode L)."""
    colour, grey = _pick_images(shared_data / "imagenette" / "train", N_IMAGES - 2, 2)
    assert len(grey) == 2, "Imagenette should contain greyscale JPEGs"
    root = tmp_path_factory.mktemp("dali_images")
    for f in colour + grey:
        shutil.copy(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def grey_files(image_dir):
    return [str(f) for f in sorted(image_dir.glob("*.JPEG")) if Image.open(f).mode == "L"]


def _loader(image_dir, **kw):
    kw = {"batch_size": 8, "num_threads": 2, "seed": 0, **kw}
    return DaliPretrainLoader(image_dir, **kw)


def test_dali_available():
    assert dali_available()


def test_shapes_dtypes_and_value_ranges(image_dir):
    loader = _loader(image_dir)
    assert len(loader) == N_IMAGES // 8
    batches = list(loader)
    assert len(batches) == len(loader) and loader.epoch == 1
    for patches, tokens in batches:
        assert patches.shape == (8, 3, 224, 224) and tokens.shape == (8, 3, 112, 112)
        assert patches.dtype == tokens.dtype == torch.float32 and patches.device.type == "cpu"
        assert patches.min() >= -1 and patches.max() <= 1 and patches.std() > 0.1
        assert tokens.min() >= 0.1 - 1e-6 and tokens.max() <= 0.9 + 1e-6
    patches, tokens = next(iter(_loader(image_dir, dtype=torch.bfloat16)))
    assert patches.dtype == tokens.dtype == torch.bfloat16


def test_greyscale_decodes_to_rgb(grey_files):
    patches, tokens = next(iter(DaliPretrainLoader(files=grey_files, batch_size=2, num_threads=1)))
    assert patches.shape == (2, 3, 224, 224)
    # saturation jitter of a grey image is still grey: the three channels agree
    assert (patches - patches[:, :1]).abs().max() < 0.02
    assert (tokens - tokens[:, :1]).abs().max() < 0.01


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_both_views_share_crop_and_flip(image_dir):
    patches, tokens = next(iter(_loader(image_dir)))
    small = F.avg_pool2d(patches * 0.5 + 0.5, 2)  # un-normalize, 224 → 112
    tokens = (tokens - 0.1) / 0.8
    for i in range(8):
        same = _corr(small[i], tokens[i])
        assert same > 0.97
        assert same > _corr(small[i], tokens[i].flip(-1)) + 0.05
        assert same > _corr(small[i], tokens[(i + 1) % 8]) + 0.2


JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def _torchvision_views(path, box, flip, factors, order):
    """The reference path with the loader's own draws: jitter (in ``order``), flip, crop, resize."""
    img = Image.open(path).convert("RGB")
    for k in order:
        img = JITTER_OPS[k](img, factors[k])
    if flip:
        img = TF.hflip(img)
        box = (box[0], img.width - box[1] - box[3], box[2], box[3])
    big = TF.resized_crop(img, *box, [224, 224], InterpolationMode.BICUBIC)
    small = TF.resized_crop(img, *box, [112, 112], InterpolationMode.LANCZOS)
    # numpy CHW in [0, 1]: tiny torch ops stall on a loaded 2-core machine
    return tuple(np.asarray(v, dtype=np.float32).transpose(2, 0, 1) / 255 for v in (big, small))


def test_pixels_match_torchvision_for_the_same_draws(image_dir):
    """Same box, flip and jitter factors → within 1/100 (mean abs) of torchvision in its closest
    jitter order. torchvision's six orders differ from each other by as much (they clip to uint8
    at different points); DALI's cubic kernel differs slightly from PIL's."""
    loader = _loader(image_dir, with_params=True, shuffle=False)
    patches, tokens, params = next(iter(loader))
    assert set(params) == {"box", "flip", "jitter"}
    assert params["jitter"].min() >= 0.6 and params["jitter"].max() <= 1.4
    big_dali, small_dali = (patches * 0.5 + 0.5).numpy(), ((tokens - 0.1) / 0.8).numpy()
    for i, file_index in enumerate(loader.shard_indices(0)[:8]):
        box, flip = tuple(params["box"][i].tolist()), bool(params["flip"][i])
        errors = []
        for order in itertools.permutations(range(3)):
            big, small = _torchvision_views(loader.files[file_index], box, flip, params["jitter"][i].tolist(), order)
            errors.append((np.abs(big_dali[i] - big).mean(), np.abs(small_dali[i] - small).mean()))
        err_big, err_small = min(e[0] for e in errors), min(e[1] for e in errors)
        assert err_big < 0.01 and err_small < 0.01, (i, err_big, err_small)
        assert np.abs(big_dali[i] - big[..., ::-1]).mean() > 2 * err_big


def _ks(a, b):
    """Two-sample Kolmogorov–Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("height,width", [(224, 224), (375, 500), (600, 200)])
def test_crop_box_distribution_matches_torchvision(height, width):
    """Area fraction and log aspect ratio: KS distance < 0.05 over 4000 draws each (the 0.1 %
    critical value is 0.044), plus matching fallback (full-image) rates."""
    n = 4000
    dali = sample_dali_crop_boxes(height, width, n, seed=1)
    rng = random.Random(1)
    ref = np.array([sample_crop_box(width, height, rng=rng) for _ in range(n)])
    for boxes in (dali, ref):
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] + boxes[:, 3] <= width).all() and (boxes[:, 2:] > 0).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)
    log_ratio = lambda b: np.log(b[:, 3] / b[:, 2])
    assert _ks(area(dali), area(ref)) < 0.05
    assert _ks(log_ratio(dali), log_ratio(ref)) < 0.05
    assert abs(np.mean(area(dali)) - np.mean(area(ref))) < 0.015
    centre = lambda b: (b[:, 1] + b[:, 3] / 2) / width
    assert abs(np.mean(centre(dali)) - 0.5) < 0.02


def test_deterministic_for_a_seed(image_dir):
    first = next(iter(_loader(image_dir, seed=5, num_threads=1)))
    again = next(iter(_loader(image_dir, seed=5, num_threads=2)))
    other = next(iter(_loader(image_dir, seed=6)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_reshuffles_every_epoch(image_dir):
    loader = _loader(image_dir)
    orders = [loader.shard_indices(e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(N_IMAGES))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert np.array_equal(_loader(image_dir, shuffle=False).shard_indices(4), np.arange(N_IMAGES))
    loader.set_epoch(7)
    assert loader.epoch == 7 and len(list(loader)) == len(loader) and loader.epoch == 8


@pytest.mark.parametrize("n_files,drop_last", [(24, True), (23, True), (23, False)])
def test_shards_are_disjoint_and_cover_all(image_dir, n_files, drop_last):
    files = sorted(str(f) for f in image_dir.glob("*.JPEG"))[:n_files]
    shards = [DaliPretrainLoader(files=files, batch_size=4, shard_id=r, num_shards=2, drop_last=drop_last)
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    for epoch in range(2):
        parts = [set(s.shard_indices(epoch).tolist()) for s in shards]
        sizes = [len(s.shard_indices(epoch)) for s in shards]
        assert sizes[0] == sizes[1] == shards[0].num_samples
        union = parts[0] | parts[1]
        if n_files % 2 == 0 or drop_last:
            assert not parts[0] & parts[1]
        assert len(union) == (n_files - n_files % 2 if drop_last else n_files)


def test_corrupt_files_are_skipped_and_counted(image_dir, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(image_dir, root)
    (root / "garbage.jpg").write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4000)))
    first = next(root.glob("*.JPEG"))
    data = first.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.open(first).convert("P").save(root / "a_gif.jpg", format="GIF")  # PIL reads it, DALI can't
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        loader = _loader(root, batch_size=6)
        batches = list(loader)  # found at run time: DALI fails, the loader rebuilds and replays
    assert len(batches) == len(loader) == (N_IMAGES + 3) // 6
    assert all(b[0].shape[0] == 6 and torch.isfinite(b[0]).all() for b in batches)
    names = ["a_gif.jpg", "garbage.jpg", "truncated.jpg"]
    assert sorted(p.rsplit("/", 1)[-1] for p in loader.bad_files) == names
    cache = tmp_path / "scan.json"
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        scanned = _loader(root, scan=True, scan_cache=cache, progress=False)
    assert len(scanned.bad_files) == 3 and cache.is_file()  # counted before training starts
    assert len(list(itertools.islice(scanned, 2))) == 2
    assert not _dali_decodes(str(root / "a_gif.jpg"), None) and _dali_decodes(str(first), None)


def test_partial_last_batch_and_mask_hook(image_dir):
    files = sorted(str(f) for f in image_dir.glob("*.JPEG"))[:10]
    calls = []

    def masks(batch_size, step):
        calls.append((batch_size, step))
        return torch.zeros(batch_size, 196, dtype=torch.bool)

    loader = DaliPretrainLoader(files=files, batch_size=4, num_threads=2, drop_last=False, masks=masks)
    sizes = [(p.shape[0], t.shape[0], m.shape) for p, t, m in loader]
    assert sizes == [(4, 4, (4, 196)), (4, 4, (4, 196)), (2, 2, (2, 196))]
    assert calls == [(4, 0), (4, 1), (2, 2)]


def test_resume_mid_epoch(image_dir):
    steps = []
    loader = _loader(image_dir, masks=lambda b, step: steps.append(step) or torch.zeros(b, 196, dtype=torch.bool))
    loader.set_epoch(2, step=1)
    assert len(list(loader)) == 2 and steps == [7, 8] and loader.epoch == 3
    for _ in itertools.islice(loader, 1):  # a broken-off epoch restarts from its first batch
        pass
    list(loader)
    assert steps[2:] == [9, 9, 10, 11]


def test_block_mask_hook():
    hook = block_mask_fn(MaskingGenerator(14, 75, min_num_patches=16), seed=3, device="cpu")
    masks = hook(4, 7)
    assert masks.shape == (4, 196) and masks.dtype == torch.bool
    assert all(60 <= int(n) <= 75 for n in masks.sum(1))
    assert torch.equal(masks, hook(4, 7)) and not torch.equal(masks, hook(4, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the DALI GPU pipeline needs CUDA")
def test_gpu_mode_matches_torchvision(image_dir):
    """device='mixed' decode and GPU ops: tensors on the GPU, same pixels as torchvision."""
    loader = _loader(image_dir, device_id=torch.cuda.current_device(), with_params=True, shuffle=False,
                     dtype=torch.bfloat16)
    patches, tokens, params = next(iter(loader))
    assert patches.is_cuda and tokens.is_cuda and patches.dtype == torch.bfloat16
    assert patches.shape == (8, 3, 224, 224) and tokens.shape == (8, 3, 112, 112)
    big_dali = (patches.float().cpu() * 0.5 + 0.5).numpy()
    for i, file_index in enumerate(loader.shard_indices(0)[:8]):
        box, flip = tuple(params["box"][i].tolist()), bool(params["flip"][i])
        factors = params["jitter"][i].tolist()
        errors = [np.abs(big_dali[i] - _torchvision_views(loader.files[file_index], box, flip, factors, o)[0]).mean()
                  for o in itertools.permutations(range(3))]
        assert min(errors) < 0.015, (i, errors)


def test_user_mistakes_raise_user_error(image_dir, tmp_path):
    files = [str(f) for f in image_dir.glob("*.JPEG")]
    bad_args = [
        {"files": files, "root": image_dir},
        {"root": image_dir, "batch_size": 0},
        {"root": image_dir, "shard_id": 2, "num_shards": 2},
        {"root": image_dir, "dtype": torch.int8},
        {"root": image_dir, "batch_size": 64},  # no full batch with drop_last
        {"root": tmp_path},  # no images
    ]
    for kw in bad_args:
        root = kw.pop("root", None)
        with pytest.raises(UserError):
            DaliPretrainLoader(root, **{"batch_size": 4, **kw})
    assert math.isclose(DaliPretrainLoader(image_dir, batch_size=4).num_samples, N_IMAGES)
