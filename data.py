"""Training and evaluation data for finetune.py and evaluate.py: images with one mask per object, read through one
small contract (`open_source`, `scan`, `ImageRef`/`ObjectRef`) whatever the format on disk.

Formats:
  - a folder `DIR/images/<name>.png|jpg|...` with `DIR/masks/<name>*.png`, one binary (0/1 or 0/255) mask per object,
    several per image allowed;
  - a `datasets` dataset saved with `save_to_disk`, with an image column and a mask column holding one mask or a list
    of masks per row (`--image-column`, `--mask-column`; a DatasetDict uses `--train-split` / `--val-split`).
Binary masks have the single class "object".
"""

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class BadSample(Exception):
    """A sample that cannot be trained on; the message is the reason, counted and printed by `scan`."""


@dataclass(frozen=True)
class ObjectRef:
    key: object  # the source's mask key: `source.mask(key)` -> bool (height, width)
    name: str
    class_id: int  # index into `source.class_names`
    box: tuple  # tight (x0, y0, x1, y1) of the mask, in image pixels


@dataclass(frozen=True)
class ImageRef:
    key: object  # the source's image key: `source.image(key)` -> PIL RGB
    name: str
    size: tuple  # (width, height)
    objects: tuple  # ObjectRef, ...


@dataclass(frozen=True)
class DataOptions:
    split: str = "train"
    image_root: str | None = None
    class_names: tuple | None = None
    ignore_index: int | None = None
    label_mode: str = "class"
    image_column: str = "image"
    mask_column: str = "mask"
    label_column: str | None = None
    revision: str | None = None


def add_data_arguments(parser) -> None:
    group = parser.add_argument_group("data format")
    group.add_argument("--image-column", default="image", help="image column of a saved dataset")
    group.add_argument("--mask-column", default="mask", help="mask column of a saved dataset: one mask or a list")
    group.add_argument("--train-split", default="train", help="training split of a saved DatasetDict")
    group.add_argument("--val-split", default="validation", help="validation split of a saved DatasetDict")


def data_options(args, split: str) -> DataOptions:
    return DataOptions(split=split, image_column=args.image_column, mask_column=args.mask_column)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; 16-bit and float images (common in medical data) are min-max scaled to 8 bits first."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
        image = Image.fromarray(array.round().astype(np.uint8))
    return image.convert("RGB")


def binary_mask(mask) -> np.ndarray:
    """A mask (PIL image or array) with values in {0, 1} or {0, 255} as a bool array (height, width)."""
    if isinstance(mask, Image.Image):
        mask = mask.convert("L") if mask.mode not in ("1", "L", "I", "I;16", "P") else mask
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        array = array[..., 0]
    if array.ndim != 2:
        raise BadSample(f"mask has shape {array.shape}, expected (height, width)")
    if array.dtype == bool:
        return array
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise BadSample(f"mask is not binary (values {values[:6].tolist()}...; expected 0/1 or 0/255)")
    return array > 0


class FolderSource:
    """`DIR/images/<name>.<ext>` with its masks `DIR/masks/<name>*.png` (a mask belongs to the longest image name that
    prefixes it, so `case1` and `case10` do not steal each other's masks)."""

    class_names = ["object"]

    def __init__(self, root: Path):
        self.root = root
        image_dir, mask_dir = root / "images", root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise SystemExit(f"error: {root} is neither a `datasets` folder nor has {folder.name}/ "
                                 "(expected DIR/images/<name>.png and DIR/masks/<name>*.png)")
        self.images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        self.masks = {stem: [] for stem in self.images}
        self.orphans = []
        for path in sorted(mask_dir.glob("*.png")):
            owner = next((path.stem[:k] for k in range(len(path.stem), 0, -1) if path.stem[:k] in self.images), None)
            (self.masks[owner] if owner is not None else self.orphans).append(path)

    def describe(self) -> str:
        return f"{self.root} (folder: {len(self.images)} images)"

    def items(self):
        """(image key, [(mask key, mask name, class id)], image name) per image."""
        for stem, path in self.images.items():
            yield stem, [(str(p), p.name, 0) for p in self.masks[stem]], path.name

    def skipped_up_front(self):
        return [(p.name, "mask without an image") for p in self.orphans]

    def image(self, key) -> Image.Image:
        with Image.open(self.images[key]) as image:
            return to_rgb(image)

    def mask(self, key) -> np.ndarray:
        with Image.open(key) as mask:
            mask.load()
            return binary_mask(mask)


class DatasetSource:
    """A `datasets.Dataset` saved with `save_to_disk`: an image column, a mask column (one mask or a list per row)."""

    class_names = ["object"]

    def __init__(self, root: Path, split: str, image_column: str, mask_column: str):
        import datasets

        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded and len(loaded) != 1:
                raise SystemExit(f"error: {root} has splits {sorted(loaded)}, no {split!r} "
                                 "(see --train-split/--val-split)")
            loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
        missing = [c for c in (image_column, mask_column) if c not in loaded.column_names]
        if missing:
            raise SystemExit(f"error: {root} has no column {missing} (columns: {loaded.column_names}; see "
                             "--image-column/--mask-column)")
        # One-column views, so that reading a mask does not decode the image of its row and vice versa.
        self.root, self.image_column, self.mask_column = root, image_column, mask_column
        self.image_rows, self.mask_rows = loaded.select_columns([image_column]), loaded.select_columns([mask_column])

    def describe(self) -> str:
        return f"{self.root} (datasets: {len(self.mask_rows)} rows)"

    def _masks(self, row: int) -> list:
        masks = self.mask_rows[row][self.mask_column]
        return list(masks) if isinstance(masks, (list, tuple)) else [masks]

    def items(self):
        for row in range(len(self.mask_rows)):
            try:
                count = len(self._masks(row))
            except Exception:
                count = 1  # decoding fails again in `scan`, which counts the mask as unreadable
            yield row, [((row, i), f"row {row} mask {i}", 0) for i in range(count)], f"row {row}"

    def skipped_up_front(self):
        return []

    def image(self, row) -> Image.Image:
        image = self.image_rows[row][self.image_column]
        return to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))

    def mask(self, key) -> np.ndarray:
        row, index = key
        return binary_mask(self._masks(row)[index])


def open_source(spec: str, options: DataOptions):
    root = Path(spec)
    if not root.exists():
        raise SystemExit(f"error: data folder {root} does not exist")
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return DatasetSource(root, options.split, options.image_column, options.mask_column)
    return FolderSource(root)


def low_res_target(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask at SAM's low-res mask grid: longest side resized to `size` as the processor resizes the image to
    `image_size`, then zero-padded bottom/right like the image, so it lines up with `pred_masks`."""
    height, width = mask.shape
    scale = size / max(height, width)
    new_size = (int(width * scale + 0.5), int(height * scale + 0.5))
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 127
    target = np.zeros((size, size), dtype=np.float32)
    target[: resized.shape[0], : resized.shape[1]] = resized
    return target


def scan(source, mask_grid: int, strict: bool, log) -> list:
    """Read every image and mask once; return the usable images (each with its usable objects) and print a count of
    the skipped ones by reason."""
    images, skipped = [], list(source.skipped_up_front())
    for image_key, masks, name in source.items():
        if not masks:
            skipped.append((name, "image without masks"))
            continue
        try:
            width, height = source.image(image_key).size
        except Exception as error:
            skipped.append((name, f"unreadable image ({type(error).__name__}: {error})"))
            continue
        objects = []
        for mask_key, mask_name, class_id in masks:
            try:
                mask = source.mask(mask_key)
            except BadSample as error:
                skipped.append((mask_name, str(error)))
                continue
            except Exception as error:
                skipped.append((mask_name, f"unreadable mask ({type(error).__name__}: {error})"))
                continue
            if mask.shape != (height, width):
                skipped.append((mask_name, f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"))
            elif not mask.any():
                skipped.append((mask_name, "empty mask"))
            elif not low_res_target(mask, mask_grid).any():
                skipped.append((mask_name, f"object vanishes at the {mask_grid}x{mask_grid} mask grid"))
            else:
                rows, cols = np.nonzero(mask)
                box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))
                objects.append(ObjectRef(mask_key, mask_name, class_id, box))
        if objects:
            images.append(ImageRef(image_key, name, (width, height), tuple(objects)))
    if skipped:
        reasons = Counter(re.sub(r" \(.*", "", reason) for _, reason in skipped)
        lines = [f"  {name}: {reason}" for name, reason in skipped[:10]]
        more = [f"  ... and {len(skipped) - 10} more"] if len(skipped) > 10 else []
        summary = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
        if strict:
            raise SystemExit("\n".join([f"error: {source.describe()}: {len(skipped)} bad samples ({summary})"]
                                       + lines + more))
        log("\n".join([f"{source.describe()}: skipped {len(skipped)} ({summary})"] + lines + more))
    if not images:
        raise SystemExit(f"error: {source.describe()} has no usable (image, mask) pair")
    log(f"{source.describe()}: {len(images)} images, {sum(len(i.objects) for i in images)} objects")
    return images
