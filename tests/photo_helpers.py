"""A real photo folder for the own-images tests: 64 px random crops of scikit-image's bundled photos, one class per
photo, in the ImageFolder layout a user would have (photos/{train,val}/<class>/NNNN.jpg). No download: skimage.data
ships these files. Seeded, so the folder (and every number computed from it) is the same on every run."""
from __future__ import annotations

import os

import numpy as np

# the 7 bundled colour photos; each becomes a class named after it
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def photo_array(name: str, short_side: int) -> np.ndarray:
    """skimage.data.<name>() as uint8 RGB, box-downscaled so its short side is about ``short_side``."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(np.asarray(getattr(data, name)())[..., :3].astype(np.uint8))
    scale = short_side / min(img.size)
    return np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.BOX))


def make_photo_folder(root: str, train_per_class: int = 48, val_per_class: int = 20, size: int = 64,
                      short_side: int = 160, seed: int = 0) -> str:
    """Write root/train/<class>/NNNN.jpg and root/val/<class>/NNNN.jpg (random size x size crops); returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        arr = photo_array(name, short_side)
        h, w = arr.shape[:2]
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                Image.fromarray(arr[top:top + size, left:left + size]).save(
                    os.path.join(folder, f"{i:04d}.jpg"), quality=95)
    return root
