"""Build tiny on-disk copies of the real dataset layouts trustcnn reads (for tests).

Each builder writes real files in the real format (JPEG/PNG via PIL, the official text files) under a
given root and returns a small description of what it wrote, so tests can assert against it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PET_CLASSES = ("Cat", "Dog")


def _photo(rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth random picture (JPEG-friendly) of ``size = (width, height)``."""
    w, h = size
    base = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base, "RGB").resize((w, h), Image.BILINEAR)
    return img.convert(mode) if mode != "RGB" else img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_pet_images(
    root: str | Path,
    n_per_class: int = 6,
    bad_files: bool = True,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> dict:
    """Write ``root/PetImages/{Cat,Dog}/`` as in the public Kaggle/Microsoft archive.

    Each class gets ``n_per_class`` ordinary RGB JPEGs ``<i>.jpg``. With ``bad_files`` it also gets the
    oddities of the real archive:

    - usable: ``gray.jpg`` (grayscale JPEG), ``cmyk.jpg`` (CMYK JPEG), ``png.jpg`` (PNG data);
    - unusable: ``truncated.jpg`` (a JPEG cut in half), ``random.jpg`` (random bytes),
      ``empty.jpg`` (0 bytes) and ``Thumbs.db``.

    Returns ``{"valid": {"Cat": [...], "Dog": [...]}, "bad": [...]}`` with paths relative to
    ``root/PetImages`` (``"Cat/1.jpg"``).
    """
    rng = np.random.default_rng(seed)
    pet = Path(root) / "PetImages"
    valid: dict[str, list[str]] = {c: [] for c in PET_CLASSES}
    bad: list[str] = []
    for cls in PET_CLASSES:
        d = pet / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            (d / f"{i}.jpg").write_bytes(jpeg_bytes(_photo(rng, size)))
            valid[cls].append(f"{cls}/{i}.jpg")
        if not bad_files:
            continue
        (d / "gray.jpg").write_bytes(jpeg_bytes(_photo(rng, size, "L")))
        (d / "cmyk.jpg").write_bytes(jpeg_bytes(_photo(rng, size, "CMYK")))
        (d / "png.jpg").write_bytes(png_bytes(_photo(rng, size)))
        valid[cls] += [f"{cls}/gray.jpg", f"{cls}/cmyk.jpg", f"{cls}/png.jpg"]
        big = jpeg_bytes(_photo(rng, (160, 120)), quality=95)
        (d / "truncated.jpg").write_bytes(big[: len(big) // 2])
        (d / "random.jpg").write_bytes(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
        (d / "empty.jpg").write_bytes(b"")
        # an OLE2 compound-file header, like a real Windows thumbnail cache
        (d / "Thumbs.db").write_bytes(bytes.fromhex("D0CF11E0A1B11AE1") + b"\0" * 504)
        bad += [f"{cls}/{n}" for n in ("truncated.jpg", "random.jpg", "empty.jpg", "Thumbs.db")]
    for cls in PET_CLASSES:
        valid[cls].sort()
    return {"valid": valid, "bad": sorted(bad)}


PET_COLOR = (255, 0, 0)
BACKGROUND_COLOR = (0, 0, 255)
BORDER_COLOR = (0, 255, 0)


def make_oxford_pet(
    root: str | Path,
    n_trainval: tuple[int, int] = (6, 6),
    n_test: tuple[int, int] = (3, 3),
    size: tuple[int, int] = (64, 48),
    box: tuple[int, int, int, int] = (14, 6, 36, 30),
    border: int = 2,
) -> dict:
    """Write ``root/oxford-iiit-pet/{images,annotations}`` in the official Oxford-IIIT Pet format, the one
    ``torchvision.datasets.OxfordIIITPet`` reads (its split files have no comment lines).

    Cats are named ``Abyssinian_<i>`` (class 1, species 1), dogs ``beagle_<i>`` (class 12, species 2).
    Every trimap (PNG, mode ``L``) has the pet = 1 on the box ``(x0, y0, x1, y1)`` (exclusive end), a
    ``border``-pixel ring of 3 around it and background 2 elsewhere (the default box is off-centre, so
    a flip of the image without the mask would show). The JPEG paints the same regions
    in :data:`PET_COLOR` (red), :data:`BORDER_COLOR` (green) and :data:`BACKGROUND_COLOR` (blue), so a
    test can check that a transformed mask lines up with the transformed image.

    Returns ``{"trainval": [(name, label)], "test": [(name, label)], "box": box, "size": size}`` with
    label cat = 0, dog = 1.
    """
    base = Path(root) / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    w, h = size
    x0, y0, x1, y1 = box
    tri = np.full((h, w), 2, np.uint8)
    tri[max(0, y0 - border) : y1 + border, max(0, x0 - border) : x1 + border] = 3
    tri[y0:y1, x0:x1] = 1
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[tri == 1] = PET_COLOR
    rgb[tri == 2] = BACKGROUND_COLOR
    rgb[tri == 3] = BORDER_COLOR

    out: dict = {"box": box, "size": size, "border": border}
    counter = {"cat": 0, "dog": 0}
    for split, (n_cat, n_dog) in (("trainval", n_trainval), ("test", n_test)):
        lines = []
        items = []
        for species, n, breed, cls_id in (("cat", n_cat, "Abyssinian", 1), ("dog", n_dog, "beagle", 12)):
            for _ in range(n):
                counter[species] += 1
                name = f"{breed}_{counter[species]}"
                Image.fromarray(rgb).save(base / "images" / f"{name}.jpg", quality=95)
                Image.fromarray(tri, "L").save(base / "annotations" / "trimaps" / f"{name}.png")
                sp = 1 if species == "cat" else 2
                lines.append(f"{name} {cls_id} {sp} {1 if species == 'cat' else 5}")
                items.append((name, sp - 1))
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = items
    return out


def make_imagenet(
    root: str | Path,
    wnids: list[str],
    n_train: int | list[int] = 4,
    n_val: int | list[int] = 2,
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
) -> dict:
    """Write ``root/{train,val}/<wnid>/*.JPEG`` (ImageFolder layout, official file names).

    ``n_train``/``n_val``: images per class (an int, or one count per wnid). Returns
    ``{"train": {wnid: [relpaths]}, "val": {...}}`` relative to ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    out: dict = {"train": {}, "val": {}}
    for split, counts in (("train", n_train), ("val", n_val)):
        counts = [counts] * len(wnids) if isinstance(counts, int) else list(counts)
        for wnid, n in zip(wnids, counts):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            names = []
            for i in range(n):
                fname = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{wnid[1:]}{i:02d}.JPEG"
                (d / fname).write_bytes(jpeg_bytes(_photo(rng, size)))
                names.append(f"{split}/{wnid}/{fname}")
            out[split][wnid] = names
    return out
