"""Datamodules on tiny on-disk copies of the real layouts (built by ``tests/layouts.py``)."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from layouts import (  # noqa: E402
    make_imagenet,
    make_oxford_pet,
    make_pet_images,
)

from trustcnn.data import (  # noqa: E402
    CatsDogsDataModule,
    DatasetLayoutError,
    DecoyDigitsDataModule,
    ImageNetSubsetDataModule,
    OxfordPetDataModule,
    denormalize,
    load_rgb,
    load_wnids,
    stratified_split,
    stratified_subsample,
)
from trustcnn.data.images import scan_images  # noqa: E402
from trustcnn.models.small_cnn import small_cnn  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def run_epoch(loader, has_masks: bool, image_size: int) -> int:
    """Iterate a whole loader, checking every batch's shapes and dtypes; return the sample count."""
    n = 0
    for x, y, m in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, image_size, image_size)
        assert y.dtype == torch.int64 and y.ndim == 1 and len(y) == len(x)
        assert m.dtype == torch.float32
        if has_masks:
            assert m.shape == (len(x), 1, image_size, image_size)
            assert set(m.unique().tolist()) <= {0.0, 1.0}
        else:
            assert m.shape == (len(x), 0)
        n += len(x)
    return n


def check_contract_attrs(dm, num_classes: int, has_masks: bool) -> None:
    """The attributes every datamodule has right after ``__init__``."""
    assert dm.num_classes == num_classes
    assert len(dm.class_names) == num_classes and all(isinstance(c, str) for c in dm.class_names)
    assert dm.has_masks is has_masks
    assert len(dm.mean) == 3 and len(dm.std) == 3
    assert isinstance(dm.test_set_names, list) and dm.test_set_names


# ==================================================================================================
# shared helpers
# ==================================================================================================


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    labels = np.random.default_rng(0).integers(0, 4, size=403)
    parts = stratified_split(labels, [0.6, 0.2, 0.2], seed=7)
    again = stratified_split(labels, [0.6, 0.2, 0.2], seed=7)
    other = stratified_split(labels, [0.6, 0.2, 0.2], seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], other[0])
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert [len(p) for p in parts] == [242, 80, 81] or abs(len(parts[1]) - 80.6) <= 1
    counts = np.bincount(labels, minlength=4)
    for p, f in zip(parts, [0.6, 0.2, 0.2]):
        assert np.all(np.abs(np.bincount(labels[p], minlength=4) - f * counts) <= 1)


def test_stratified_split_tiny_classes_still_fill_every_part():
    labels = np.repeat(np.arange(3), 3)  # 3 classes x 3 samples, 10% val
    train, val = stratified_split(labels, [0.9, 0.1], seed=0)
    assert len(val) == 1 and len(train) == 8


def test_stratified_subsample_deterministic_and_balanced():
    labels = np.repeat(np.arange(5), 20)
    a = stratified_subsample(labels, 25, seed=1)
    assert np.array_equal(a, stratified_subsample(labels, 25, seed=1))
    assert not np.array_equal(a, stratified_subsample(labels, 25, seed=2))
    assert np.bincount(labels[a]).tolist() == [5] * 5
    assert len(stratified_subsample(labels, None, seed=0)) == 100


def test_denormalize_inverts_normalization():
    x = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(denormalize((x - m) / s, IMAGENET_MEAN, IMAGENET_STD), x, atol=1e-6)


# ==================================================================================================
# decoy digits
# ==================================================================================================


@pytest.fixture(scope="module")
def decoy():
    dm = DecoyDigitsDataModule(batch_size=128, seed=3)
    check_contract_attrs(dm, 10, True)
    assert dm.test_set_names == ["test", "test_consistent"]
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.5, 0.5, 0.5)
    dm.setup("fit")
    return dm


def test_decoy_loaders_shapes_and_sizes(decoy):
    s = decoy.image_size
    sizes = decoy.split_sizes()
    assert sum(sizes[k] for k in ("train", "val", "test")) == 1797
    assert sizes["test"] == sizes["test_consistent"]
    assert run_epoch(decoy.train_dataloader(), True, s) == sizes["train"]
    assert run_epoch(decoy.val_dataloader(), True, s) == sizes["val"]
    loaders = decoy.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    for name, loader in zip(decoy.test_set_names, loaders):
        assert run_epoch(loader, True, s) == sizes[name]


def _patch_shades(dm, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the decoy shade back from the rendered, normalized images (mean of the corner patch)."""
    s, p = dm.image_size, dm.patch_size
    ds = dm.train_set if split == "train" else dm.val_set if split == "val" else (
        dm.test_sets[dm.test_set_names.index(split)]
    )
    imgs = dm.denormalize(ds.images)
    corners = dm.splits[split]["corners"]
    shades = torch.empty(len(imgs))
    for i, c in enumerate(corners.tolist()):
        r0 = 0 if c in (0, 1) else s - p
        c0 = 0 if c in (0, 2) else s - p
        patch = imgs[i, :, r0 : r0 + p, c0 : c0 + p]
        assert torch.allclose(patch, patch.mean(), atol=1e-5), "the patch is one flat gray"
        shades[i] = patch.mean()
    return shades, ds.labels


def test_decoy_shade_is_a_function_of_the_label_in_train_val_and_consistent_test(decoy):
    expected = torch.as_tensor(decoy.shades)
    for split in ("train", "val", "test_consistent"):
        shades, labels = _patch_shades(decoy, split)
        assert torch.allclose(shades, expected[labels], atol=1e-5), split
    assert len(set(np.round(decoy.shades, 5).tolist())) == 10


def test_decoy_shade_is_independent_of_the_label_in_test(decoy):
    shades, labels = _patch_shades(decoy, "test")
    expected = torch.as_tensor(decoy.shades)
    matches = torch.isclose(shades, expected[labels], atol=1e-5).float().mean().item()
    assert matches < 0.25  # ~1/10 by chance
    shade_class = torch.cdist(shades[:, None], expected[:, None]).argmin(1)
    table = np.zeros((10, 10))
    for y, k in zip(labels.tolist(), shade_class.tolist()):
        table[y, k] += 1
    assert (table > 0).sum(1).min() >= 5  # every digit is seen with many different shades
    # chi-square test of independence between label and shade: not rejected at 0.1%
    from scipy.stats import chi2_contingency

    assert chi2_contingency(table + 1e-9).pvalue > 1e-3
    # same digits, same corners as the consistent copy; only the shade differs
    assert torch.equal(decoy.splits["test"]["index"], decoy.splits["test_consistent"]["index"])
    assert torch.equal(decoy.splits["test"]["corners"], decoy.splits["test_consistent"]["corners"])


def test_decoy_corners_vary_and_mask_is_strokes_not_patch(decoy):
    s, p = decoy.image_size, decoy.patch_size
    assert set(decoy.splits["train"]["corners"].tolist()) == {0, 1, 2, 3}
    masks = decoy.train_set.masks
    assert masks.shape[1:] == (1, s, s) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    margin = torch.ones(s, s, dtype=torch.bool)
    margin[p : s - p, p : s - p] = False
    assert masks[:, 0][:, margin].sum() == 0, "no mask outside the digit area (patch included)"
    frac = masks.mean((1, 2, 3))
    assert frac.min() > 0.03 and frac.max() < 0.6
    # the mask covers the bright stroke pixels of the (unnormalized) digit
    imgs = decoy.splits["train"]["images"][:, 0]
    inner = imgs[:, p : s - p, p : s - p]
    minner = masks[:, 0, p : s - p, p : s - p].bool()
    assert inner[minner].mean() > 3 * inner[~minner].mean()


def test_decoy_is_deterministic_from_the_seed(decoy):
    same = DecoyDigitsDataModule(batch_size=128, seed=3)
    same.setup()
    for split in ("train", "val", "test", "test_consistent"):
        for key in ("images", "labels", "masks", "corners", "shades", "index"):
            assert torch.equal(decoy.splits[split][key], same.splits[split][key]), (split, key)
    other = DecoyDigitsDataModule(batch_size=128, seed=4)
    other.setup()
    assert not torch.equal(decoy.splits["train"]["index"], other.splits["train"]["index"])
    # stratified: each digit's share in train matches its share overall
    labels = decoy.train_set.labels
    assert np.abs(np.bincount(labels.numpy()) / len(labels) - 0.1).max() < 0.015


def test_decoy_train_loader_order_is_a_function_of_seed_and_epoch(decoy):
    """A rebuilt loader (as after a resume) gives epoch e the same order; epochs differ from each other."""
    def first_batch(epoch: int) -> torch.Tensor:
        loader = decoy.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning does before every training epoch
        return next(iter(loader))[1]

    assert torch.equal(first_batch(0), first_batch(0))
    assert torch.equal(first_batch(2), first_batch(2))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_decoy_denormalize_gives_unit_range(decoy):
    x = next(iter(decoy.val_dataloader()))[0]
    d = decoy.denormalize(x)
    assert d.min() >= 0 and d.max() <= 1
    assert torch.allclose(d, decoy.splits["val"]["images"][: len(x)], atol=1e-6)


def test_decoy_rejects_bad_settings():
    with pytest.raises(ValueError, match="patch_size"):
        DecoyDigitsDataModule(image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="shade"):
        DecoyDigitsDataModule(shade_min=0.8, shade_max=0.5)


def test_small_cnn_contract():
    built = small_cnn(10)
    names = dict(built.net.named_modules())
    assert built.target_layer == "features.conv3"
    assert isinstance(names[built.target_layer], torch.nn.Conv2d)
    assert built.trainable == ["features.conv3"]
    assert built.input_size == 32 and built.mean == (0.5,) * 3 and built.std == (0.5,) * 3
    feats = {}
    h = names[built.target_layer].register_forward_hook(lambda m, i, o: feats.setdefault("A", o))
    out = built.net(torch.randn(2, 3, 32, 32))
    h.remove()
    assert out.shape == (2, 10)
    assert feats["A"].shape[-2:] == (8, 8)  # target conv keeps spatial extent for Grad-CAM
    every = small_cnn(10, trainable="all").trainable
    assert set(every) >= {"features.conv1", "features.conv2", "features.conv3", "head.fc"}
    assert all(n in names for n in every)
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in built.net.modules())


# ==================================================================================================
# cats vs dogs (PetImages)
# ==================================================================================================


@pytest.fixture
def pets(tmp_path):
    root = tmp_path / "data"
    info = make_pet_images(root, n_per_class=6, bad_files=True)
    return root, info, tmp_path / "cache"


def test_load_rgb_handles_the_oddities(pets):
    root, info, _ = pets
    pet = root / "PetImages"
    for rel in ("Cat/gray.jpg", "Cat/cmyk.jpg", "Cat/png.jpg", "Dog/0.jpg"):
        img = load_rgb(pet / rel)
        assert img.mode == "RGB" and img.size == (48, 40)
    for rel in info["bad"]:
        with pytest.raises(Exception):
            load_rgb(pet / rel)


def test_cats_dogs_skips_counts_and_logs_bad_files(pets, caplog):
    root, info, cache = pets
    dm = CatsDogsDataModule(root=str(root), batch_size=4, num_workers=0, image_size=32,
                            cache_dir=str(cache), seed=0, val_fraction=0.2, test_fraction=0.2)
    check_contract_attrs(dm, 2, False)
    assert dm.class_names == ["cat", "dog"] and dm.mean == IMAGENET_MEAN and dm.std == IMAGENET_STD
    with caplog.at_level(logging.INFO, logger="trustcnn.data"):
        dm.setup("fit")
    assert dm.num_skipped == len(info["bad"]) == 8
    assert sorted(r for r, _ in dm.skipped_files) == info["bad"]
    warning = [r.getMessage() for r in caplog.records
               if r.name == "trustcnn.data" and r.levelno == logging.WARNING]
    assert any("skipped 8 of 26" in m for m in warning), warning
    msg = next(m for m in warning if "skipped 8" in m)
    for rel in info["bad"]:
        assert rel in msg
    # every usable file (incl. gray, CMYK, PNG-as-.jpg) is in exactly one split, with its label
    used = {}
    for ds in (dm.train_set, dm.val_set, *dm.test_sets):
        for p, y in zip(ds.paths, ds.labels):
            rel = Path(p).relative_to(root / "PetImages").as_posix()
            assert rel not in used
            used[rel] = y
    expected = {r: 0 for r in info["valid"]["Cat"]} | {r: 1 for r in info["valid"]["Dog"]}
    assert used == expected
    sizes = dm.split_sizes()
    assert sizes == {"train": 11, "val": 3, "test": 4}
    for ds in (dm.train_set, dm.val_set, dm.test_sets[0]):
        assert sorted(set(ds.labels)) == [0, 1], "stratified: both classes in every split"
    # a full epoch of every loader
    assert run_epoch(dm.train_dataloader(), False, 32) == sizes["train"]
    assert run_epoch(dm.val_dataloader(), False, 32) == sizes["val"]
    assert run_epoch(dm.test_dataloader(), False, 32) == sizes["test"]
    # the odd-but-valid files decode to (3, H, W)
    test_ds = CatsDogsDataModule(root=str(root), image_size=32, cache_dir=str(cache), augment=False)
    test_ds.setup()
    for ds in (test_ds.train_set, test_ds.val_set, test_ds.test_sets[0]):
        for i, p in enumerate(ds.paths):
            if Path(p).name in ("gray.jpg", "cmyk.jpg", "png.jpg"):
                x, y, m = ds[i]
                assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and m.numel() == 0


def test_cats_dogs_workers_and_root_untouched(pets):
    root, _, cache = pets
    before = sorted(p.as_posix() for p in root.rglob("*"))
    dm = CatsDogsDataModule(root=str(root), batch_size=8, num_workers=1, image_size=24,
                            cache_dir=str(cache))
    dm.setup()
    assert run_epoch(dm.train_dataloader(), False, 24) == dm.split_sizes()["train"]
    assert sorted(p.as_posix() for p in root.rglob("*")) == before  # nothing written into root
    assert list(cache.glob("scan-*.json")), "the scan cache lives in cache_dir"


def test_cats_dogs_scan_cache_avoids_redecoding(pets, caplog):
    root, _, cache = pets
    kwargs = dict(root=str(root), image_size=32, cache_dir=str(cache))
    CatsDogsDataModule(**kwargs).setup()
    with caplog.at_level(logging.INFO, logger="trustcnn.data"):
        caplog.clear()
        dm = CatsDogsDataModule(**kwargs)
        dm.setup()
    assert any("all 26 files known from the scan cache" in r.getMessage() for r in caplog.records)
    assert dm.num_skipped == 8
    # a changed file is re-decoded (and only it): a once-valid image becomes truncated
    victim = root / "PetImages" / "Dog" / "3.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="trustcnn.data"):
        caplog.clear()
        dm = CatsDogsDataModule(**kwargs)
        dm.setup()
    assert any("decoding 1 of 26 files" in r.getMessage() for r in caplog.records)
    assert dm.num_skipped == 9 and "Dog/3.jpg" in {r for r, _ in dm.skipped_files}


def test_cats_dogs_file_failing_after_the_scan_falls_back(pets, caplog):
    root, _, cache = pets
    dm = CatsDogsDataModule(root=str(root), image_size=32, cache_dir=str(cache), augment=False)
    dm.setup()
    ds = dm.train_set
    Path(ds.paths[0]).write_bytes(b"not an image any more")
    with caplog.at_level(logging.WARNING, logger="trustcnn.data"):
        x, y, _ = ds[0]
        x2, y2, _ = ds[0]
    assert x.shape == (3, 32, 32) and torch.equal(x, x2) and y == y2 == ds.labels[1]
    assert torch.equal(x, ds[1][0]), "deterministic fallback: the next readable sample"
    assert any(Path(ds.paths[0]).name in r.getMessage() for r in caplog.records)
    assert run_epoch(torch.utils.data.DataLoader(ds, batch_size=5), False, 32) == len(ds)


def test_cats_dogs_split_is_deterministic(pets):
    root, _, cache = pets

    def paths(seed):
        dm = CatsDogsDataModule(root=str(root), image_size=32, cache_dir=str(cache), seed=seed)
        dm.setup()
        return dm.train_set.paths, dm.test_sets[0].paths

    assert paths(0) == paths(0)
    assert any(paths(0)[1] != paths(s)[1] for s in (1, 2, 3))


def test_scan_without_cache_and_with_unwritable_cache(pets, caplog):
    root, info, cache = pets
    tmp = cache.parent
    pet = root / "PetImages"
    rels = info["valid"]["Cat"] + info["bad"]
    valid, skipped = scan_images(pet, rels, cache_dir=None, workers=1)
    assert valid == info["valid"]["Cat"] and sorted(r for r, _ in skipped) == info["bad"]
    blocker = tmp / "file-not-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="trustcnn.data"):
        valid2, _ = scan_images(pet, rels, cache_dir=blocker / "sub", workers=2)
    assert valid2 == valid
    assert any("could not write the scan cache" in r.getMessage() for r in caplog.records)


def test_cats_dogs_wrong_roots(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"data\.root is unset[\s\S]*PetImages/Cat"):
        CatsDogsDataModule(root=None).setup()
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as e:
        CatsDogsDataModule(root=str(missing)).setup()
    assert str(missing) in str(e.value) and "PetImages/Dog/*.jpg" in str(e.value)
    assert "kagglecatsanddogs" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(empty / "PetImages" / "Cat"))):
        CatsDogsDataModule(root=str(empty)).setup()
    make_pet_images(tmp_path / "d", n_per_class=3, bad_files=False)
    with pytest.raises(DatasetLayoutError, match="use its parent"):
        CatsDogsDataModule(root=str(tmp_path / "d" / "PetImages")).setup()
    junk = tmp_path / "junk" / "PetImages"
    for c in ("Cat", "Dog"):
        (junk / c).mkdir(parents=True)
        (junk / c / "Thumbs.db").write_bytes(b"\0" * 10)
    with pytest.raises(DatasetLayoutError, match="0 decodable images"):
        CatsDogsDataModule(root=str(tmp_path / "junk"), cache_dir=None).setup()


# ==================================================================================================
# Oxford-IIIT Pet
# ==================================================================================================


@pytest.fixture
def oxford(tmp_path):
    info = make_oxford_pet(tmp_path, n_trainval=(8, 12), n_test=(3, 4))
    return tmp_path, info


def _region_agreement(x: torch.Tensor, m: torch.Tensor, mean, std, border_as: int) -> float:
    """Agreement of the mask with the colour-coded regions of the transformed image (red pet, green
    border, blue background), over the pixels whose colour is unambiguous (JPEG and resampling blur
    the edges)."""
    img = denormalize(x, mean, std)
    top, which = img.max(0)
    sure = top > 0.6
    sure &= (img.sum(0) - top) < 0.5
    target = (which == 0) | ((which == 1) & bool(border_as))
    assert sure.float().mean() > 0.75
    return (target == m[0].bool())[sure].float().mean().item()


def test_oxford_labels_masks_and_splits(oxford):
    root, info = oxford
    dm = OxfordPetDataModule(root=str(root), batch_size=4, num_workers=0, image_size=32, seed=0)
    check_contract_attrs(dm, 2, True)
    assert dm.class_names == ["cat", "dog"] and dm.mean == IMAGENET_MEAN
    dm.setup("fit")
    sizes = dm.split_sizes()
    assert sizes == {"train": 18, "val": 2, "test": 7}
    # labels come from the SPECIES column (cat 1 -> 0, dog 2 -> 1)
    names = [Path(p).stem for p in dm.test_sets[0].paths]
    assert dict(zip(names, dm.test_sets[0].labels)) == dict(info["test"])
    assert sorted(set(dm.val_set.labels)) == [0, 1], "val stratified by species"
    tv = dict(info["trainval"])
    for ds in (dm.train_set, dm.val_set):
        for p, y in zip(ds.paths, ds.labels):
            assert tv[Path(p).stem] == y
    assert not set(dm.train_set.paths) & set(dm.val_set.paths)
    for loader, n in ((dm.train_dataloader(), 18), (dm.val_dataloader(), 2), (dm.test_dataloader(), 7)):
        assert run_epoch(loader, True, 32) == n
    again = OxfordPetDataModule(root=str(root), image_size=32, seed=0)
    again.setup()
    assert again.val_set.paths == dm.val_set.paths


@pytest.mark.parametrize("border_as", [1, 0])
def test_oxford_mask_pixels_follow_the_trimap_rule(oxford, border_as):
    """Through the whole eval transform, pixel for pixel: with ``image_size=42`` the 64x48 image keeps its
    size (short side round(42 * 256/224) = 48) and is center-cropped to rows 3:45, columns 11:53."""
    root, info = oxford
    dm = OxfordPetDataModule(root=str(root), image_size=42, border_as=border_as, seed=0)
    dm.setup("test")
    w, h = info["size"]
    x0, y0, x1, y1 = info["box"]
    b = info["border"]
    trimap = np.full((h, w), 2)
    trimap[y0 - b : y1 + b, x0 - b : x1 + b] = 3
    trimap[y0:y1, x0:x1] = 1
    expected = (trimap == 1) | ((trimap == 3) & bool(border_as))
    for i in range(len(dm.test_sets[0])):
        _, _, m = dm.test_sets[0][i]
        assert torch.equal(m[0], torch.from_numpy(expected[3:45, 11:53]).float())


def test_oxford_unreadable_image_falls_back_to_the_next(oxford, caplog):
    root, info = oxford
    first = info["test"][0][0]
    (root / "oxford-iiit-pet" / "images" / f"{first}.jpg").write_bytes(b"not a jpeg")
    dm = OxfordPetDataModule(root=str(root), image_size=32, seed=0)
    dm.setup("test")
    test = dm.test_sets[0]
    with caplog.at_level(logging.WARNING, logger="trustcnn.data"):
        x, _, _ = test[0]
    assert f"{first}.jpg" in caplog.text
    assert torch.equal(x, test[1][0]), "the next readable image stands in"


@pytest.mark.parametrize("border_as", [1, 0])
def test_oxford_mask_aligned_with_image_eval_and_train(oxford, border_as):
    root, info = oxford
    dm = OxfordPetDataModule(root=str(root), image_size=40, border_as=border_as, seed=0)
    dm.setup()
    x, _, m = dm.test_sets[0][0]
    assert m.shape == (1, 40, 40) and m.dtype == torch.float32
    assert _region_agreement(x, m, dm.mean, dm.std, border_as) > 0.97
    # known geometry: the 64x48 image is resized so its short side is round(40 * 256/224) = 46 px
    # (61x46), then center-cropped to 40x40 (offsets 10, 3): the box edges land where predicted
    sx, sy, off_x, off_y = 61 / 64, 46 / 48, 10, 3
    x0, y0, x1, y1 = info["box"]
    b = info["border"] * border_as
    cy, cx = int((y0 + y1) / 2 * sy - off_y), int((x0 + x1) / 2 * sx - off_x)
    assert m[0, cy, cx] == 1
    assert m[0, 1, 1] == 0 and m[0, -2, -2] == 0
    rows = m[0, :, cx].nonzero().flatten()
    cols = m[0, cy, :].nonzero().flatten()
    assert abs(rows.min().item() - ((y0 - b) * sy - off_y)) <= 1.5
    assert abs(rows.max().item() + 1 - ((y1 + b) * sy - off_y)) <= 1.5
    assert abs(cols.min().item() - ((x0 - b) * sx - off_x)) <= 1.5
    assert abs(cols.max().item() + 1 - ((x1 + b) * sx - off_x)) <= 1.5
    # train transform: random resized crop + flip, applied jointly to image and mask
    torch.manual_seed(0)
    controls = 0
    for i in range(len(dm.train_set)):
        x, _, m = dm.train_set[i]
        agree = _region_agreement(x, m, dm.mean, dm.std, border_as)
        assert agree > 0.95
        if (m != m.flip(-1)).float().mean() > 0.2:  # negative control: a mirrored image misfits
            controls += 1
            assert _region_agreement(x.flip(-1), m, dm.mean, dm.std, border_as) < agree - 0.1
    assert controls >= 3


def test_oxford_download_goes_through_torchvision(tmp_path, monkeypatch):
    """``download=True`` hands torchvision's OxfordIIITPet the folder above ``oxford-iiit-pet/``: what its
    downloader unpacks there is what ``setup`` reads (the network is replaced by writing the tiny layout)."""
    import torchvision.datasets.oxford_iiit_pet as tv_pet

    fetched = []

    def unpack(url: str, download_root: str, md5: str | None = None) -> None:
        if not fetched:
            make_oxford_pet(Path(download_root).parent, n_trainval=(3, 3), n_test=(2, 2))
        fetched.append(url.rsplit("/", 1)[1])

    monkeypatch.setattr(tv_pet, "download_and_extract_archive", unpack)
    dm = OxfordPetDataModule(root=str(tmp_path / "data"), image_size=32, download=True)
    dm.setup()
    assert fetched == ["images.tar.gz", "annotations.tar.gz"]
    assert dm.split_sizes() == {"train": 5, "val": 1, "test": 4}
    OxfordPetDataModule(root=str(tmp_path / "data"), image_size=32, download=True).setup()
    assert len(fetched) == 2, "a complete copy is not downloaded again"


def test_oxford_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="data.root is unset"):
        OxfordPetDataModule(root=None).setup()
    with pytest.raises(DatasetLayoutError) as e:
        OxfordPetDataModule(root=str(tmp_path)).setup()
    msg = str(e.value)
    assert str(tmp_path) in msg and "data.download=true" in msg
    assert "annotations/trimaps/<Name>.png" in msg and "oxford-iiit-pet/images" in msg
    make_oxford_pet(tmp_path, n_trainval=(3, 3), n_test=(2, 2))
    with pytest.raises(DatasetLayoutError, match="use its parent"):
        OxfordPetDataModule(root=str(tmp_path / "oxford-iiit-pet")).setup()
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations" / "trimaps" / "beagle_2.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing, e\.g\. .*beagle_2\.png"):
        OxfordPetDataModule(root=str(tmp_path)).setup()
    (base / "annotations" / "trimaps" / "beagle_2.png").write_bytes(b"")
    (base / "annotations" / "test.txt").write_text("Abyssinian_1 1 7 1\n")
    with pytest.raises(DatasetLayoutError, match=r"test\.txt gives 1 image.*Abyssinian_1 with SPECIES 7"):
        OxfordPetDataModule(root=str(tmp_path)).setup()
    (base / "annotations" / "test.txt").write_text("#Image CLASS-ID SPECIES BREED ID\nAbyssinian_1 1 1 1\n")
    with pytest.raises(DatasetLayoutError, match=r"test\.txt is not a list of 'Image CLASS-ID SPECIES BREED-ID'"):
        OxfordPetDataModule(root=str(tmp_path)).setup()
    (base / "annotations" / "test.txt").write_text("")
    with pytest.raises(DatasetLayoutError, match=r"test\.txt lists no images"):
        OxfordPetDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="border_as"):
        OxfordPetDataModule(root=str(tmp_path), border_as=2)


# ==================================================================================================
# ImageNet subset
# ==================================================================================================

WNIDS3 = ["n01440764", "n02123045", "n15075141"]  # tench (0), tabby (281), toilet tissue (999)


def test_shipped_wnids_are_the_standard_1000():
    wnids = load_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    from torchvision.models import ResNet50_Weights

    cats = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    for wnid, name in (("n01440764", "tench"), ("n02123045", "tabby"), ("n15075141", "toilet tissue"),
                       ("n02690373", "airliner"), ("n07753592", "banana")):
        assert cats[wnids.index(wnid)] == name
    # torchvision's Imagenette wnids are a subset
    from torchvision.datasets.imagenette import Imagenette

    assert set(Imagenette._WNID_TO_CLASS) <= set(wnids)


def test_wnids_file_loc_synset_mapping_format(tmp_path):
    wnids = load_wnids()
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("\n".join(f"{w} some name, other" for w in wnids) + "\n")
    assert load_wnids(loc) == wnids
    (tmp_path / "short.txt").write_text("\n".join(wnids[:10]))
    with pytest.raises(DatasetLayoutError, match="exactly the 1000"):
        load_wnids(tmp_path / "short.txt")
    with pytest.raises(DatasetLayoutError, match="not found"):
        load_wnids(tmp_path / "nope.txt")
    with pytest.raises(DatasetLayoutError, match="LOC_synset_mapping"):
        ImageNetSubsetDataModule(wnids_file=str(tmp_path / "short.txt"))


def test_imagenet_1000_way_labels_and_subset(tmp_path):
    make_imagenet(tmp_path, WNIDS3, n_train=10, n_val=3)
    dm = ImageNetSubsetDataModule(root=str(tmp_path), batch_size=4, num_workers=0, image_size=32,
                                  subset_size=15, val_fraction=0.2, seed=0)
    check_contract_attrs(dm, 1000, False)
    assert dm.class_names[281] == "n02123045" and dm.readable_names[281] == "tabby"
    dm.setup()
    assert dm.split_sizes() == {"train": 12, "val": 3, "test": 9}
    labels = dm.train_set.labels + dm.val_set.labels
    assert sorted(np.unique(labels).tolist()) == [0, 281, 999]
    assert np.bincount(labels, minlength=1000)[[0, 281, 999]].tolist() == [5, 5, 5]
    assert sorted(set(dm.val_set.labels)) == [0, 281, 999]
    for ds in (dm.train_set, dm.val_set, dm.test_sets[0]):
        for p, y in zip(ds.paths, ds.labels):
            assert Path(p).parent.name == dm.class_names[y]
    assert all(Path(p).parts[-3] == "val" for p in dm.test_sets[0].paths)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        n = 0
        for x, y, m in loader:
            assert x.shape[1:] == (3, 32, 32) and m.shape == (len(x), 0)
            assert set(y.tolist()) <= {0, 281, 999}
            n += len(y)
        assert n == len(loader.dataset)
    # deterministic subset sampling
    same = ImageNetSubsetDataModule(root=str(tmp_path), image_size=32, subset_size=15,
                                    val_fraction=0.2, seed=0)
    same.setup()
    assert same.train_set.paths == dm.train_set.paths and same.val_set.paths == dm.val_set.paths
    other = ImageNetSubsetDataModule(root=str(tmp_path), image_size=32, subset_size=15,
                                     val_fraction=0.2, seed=5)
    other.setup()
    assert set(other.train_set.paths + other.val_set.paths) != set(dm.train_set.paths + dm.val_set.paths)


def test_imagenet_classes_and_val_from_val(tmp_path):
    make_imagenet(tmp_path, WNIDS3, n_train=4, n_val=2)
    dm = ImageNetSubsetDataModule(root=str(tmp_path), image_size=32, classes=["n15075141", "n01440764"],
                                  subset_size=None, val_from="val", test_subset_size=2)
    dm.setup()
    assert sorted(set(dm.train_set.labels)) == [0, 999] and len(dm.train_set) == 8
    assert dm.val_set is dm.test_sets[0] and len(dm.test_sets[0]) == 2
    assert sorted(dm.test_sets[0].labels) == [0, 999]
    with pytest.raises(ValueError, match="not ImageNet-1k wnids"):
        ImageNetSubsetDataModule(root=str(tmp_path), classes=["n99999999"])


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="data.root is unset"):
        ImageNetSubsetDataModule(root=None).setup()
    with pytest.raises(DatasetLayoutError) as e:
        ImageNetSubsetDataModule(root=str(tmp_path)).setup()
    assert str(tmp_path / "train") in str(e.value) and "<root>/train/<wnid>/*.JPEG" in str(e.value)
    make_imagenet(tmp_path / "a", WNIDS3[:2], n_train=2, n_val=1)
    (tmp_path / "a" / "train" / "cats").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"not ImageNet-1k wnids: \['cats'\]"):
        ImageNetSubsetDataModule(root=str(tmp_path / "a")).setup()
    make_imagenet(tmp_path / "b", WNIDS3[:2], n_train=2, n_val=1)
    import shutil

    shutil.rmtree(tmp_path / "b" / "val" / WNIDS3[1])
    with pytest.raises(DatasetLayoutError, match=re.escape(str(tmp_path / "b" / "val" / WNIDS3[1]))):
        ImageNetSubsetDataModule(root=str(tmp_path / "b")).setup()
    flat = tmp_path / "c"
    make_imagenet(flat, WNIDS3[:1], n_train=2, n_val=1)
    shutil.rmtree(flat / "val")
    (flat / "val").mkdir()
    (flat / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(
        (flat / "train" / WNIDS3[0] / f"{WNIDS3[0]}_0.JPEG").read_bytes()
    )
    with pytest.raises(DatasetLayoutError, match="flat layout"):
        ImageNetSubsetDataModule(root=str(flat)).setup()


def test_imagenet_validate_files_drops_unreadable(tmp_path):
    info = make_imagenet(tmp_path, WNIDS3[:2], n_train=4, n_val=2)
    (tmp_path / info["train"][WNIDS3[0]][0]).write_bytes(b"")
    dm = ImageNetSubsetDataModule(root=str(tmp_path), image_size=32, subset_size=None,
                                  val_fraction=0.25, validate_files=True, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 7


@pytest.mark.slow
def test_decoy_shortcut_is_learned_by_plain_cross_entropy():
    """The tuned defaults: a CE-trained small_cnn fits train and leans on the decoy (~5-10 s)."""
    import argparse
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "decoy_shortcut.py"
    spec = importlib.util.spec_from_file_location("decoy_shortcut", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d = bench.DM_DEFAULTS
    args = argparse.Namespace(
        image_size=d["image_size"], patch_size=d["patch_size"], shade_min=d["shade_min"],
        shade_max=d["shade_max"], digit_intensity=d["digit_intensity"], width=bench.WIDTH,
        batch_norm=False, cosine=True, epochs=bench.EPOCHS, lr=bench.LR, batch_size=bench.BATCH,
    )
    r = bench.run(args, seed=0)
    assert r["train"] >= 0.95 and r["test_consistent"] >= 0.9 and r["test"] <= 0.6, r
