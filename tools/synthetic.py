"""Synthetic shapes for trying the tools without data: noisy grey images with one bright disc or rectangle each, in
the masks-folder format (`images/NAME.png`, `masks/NAME_0.png`). The tests train on them; the README's CPU try too:

    python -c "from sam_split.tools.synthetic import write_shapes; write_shapes('shapes/train', 32, seed=0)"
"""

from pathlib import Path

import numpy as np
from PIL import Image


def write_shapes(root, count: int, seed: int, size: int = 64) -> Path:
    """`count` noisy grey `size`x`size` images, each with one bright disc or rectangle, and its 0/255 mask as
    `<name>_0.png`, in the new folder `root`. Shapes scale with `size` (radius 6-14 pixels at 64)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, cols = np.mgrid[:size, :size]
    scale = size / 64
    for i in range(count):
        image = rng.normal(60, 25, (size, size, 3))
        center_row, center_col = rng.integers(int(16 * scale), size - int(16 * scale), 2)
        radius = int(rng.integers(6, 14)) * scale
        if i % 2:
            mask = (rows - center_row) ** 2 + (cols - center_col) ** 2 <= radius**2
        else:
            mask = (abs(rows - center_row) <= radius) & (abs(cols - center_col) <= radius * 0.7)
        image[mask] += 130
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"img{i:02d}_0.png")
    return root
