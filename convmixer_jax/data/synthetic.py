"""``synthetic_shapes``: a procedurally generated, offline TFDS image-classification dataset.

Why it exists: the quickstart and the test-suite need a dataset that needs no network access,
is bit-for-bit reproducible, prepares in seconds, and is still *learnable*, so that a short
training run can show the loss going down and the accuracy going up.

What it is: 32x32 RGB images, each showing one coloured shape out of 10 classes (disk, ring,
square, frame, diamond, triangle_up, triangle_down, plus, x_cross, hbar) at a random position
and size (45%-80% of the image side), drawn on a textured background (a low-frequency colour
gradient plus random stripes or smooth blotchy noise), with mild pixel noise. The shape colour
is taken from the opposite brightness band to the background, so it always contrasts clearly.
The classes stay distinguishable after a horizontal flip and after mild aspect changes (e.g.
random resized crops with aspect ratio 3/4-4/3).

Every example is a pure function of ``(split, index)``: its random generator is
``np.random.default_rng([split_id, index])``. Labels are balanced (``label = index % 10``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

IMAGE_SIZE = 32
NUM_CLASSES = 10
TRAIN_SIZE = 5000
TEST_SIZE = 1000
SPLIT_SIZES: dict[str, int] = {"train": TRAIN_SIZE, "test": TEST_SIZE}
SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}
CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "frame",
    "diamond",
    "triangle_up",
    "triangle_down",
    "plus",
    "x_cross",
    "hbar",
)

MIN_SIZE_FRAC = 0.45  # shape bounding-box side, as a fraction of the image side
MAX_SIZE_FRAC = 0.80
DARK_BAND = (15.0, 95.0)  # per-channel colour range of the dark brightness band
BRIGHT_BAND = (160.0, 240.0)
TEXTURE_AMPLITUDE = (8.0, 18.0)  # background texture amplitude range (grey levels)
PIXEL_NOISE_STD = 4.0
SUPERSAMPLE = 4  # sub-pixels per pixel side used to anti-alias the shape edges


def shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class ``label`` at normalised coordinates ``(u, v)``.

    ``u`` points right and ``v`` points down (image rows); the shape is centred at (0, 0) and fits
    in the square ``[-1, 1]^2``. Inputs broadcast against each other.
    """
    au, av = np.abs(u), np.abs(v)
    r2 = u * u + v * v
    cheb = np.maximum(au, av)
    name = CLASS_NAMES[label]
    if name == "disk":
        return r2 <= 1.0
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if name == "square":
        return cheb <= 0.85
    if name == "frame":
        return (cheb <= 0.9) & (cheb >= 0.5)
    if name == "diamond":
        return au + av <= 1.0
    if name == "triangle_up":  # apex at the top, base at the bottom
        return (av <= 0.9) & (au <= (v + 0.9) / 1.8)
    if name == "triangle_down":
        return (av <= 0.9) & (au <= (0.9 - v) / 1.8)
    if name == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "x_cross":
        return (cheb <= 0.85) & ((np.abs(u - v) <= 0.42) | (np.abs(u + v) <= 0.42))
    if name == "hbar":
        return (au <= 1.0) & (av <= 0.3)
    raise ValueError(f"unknown label {label}")


@dataclasses.dataclass(frozen=True)
class ExampleInfo:
    """Generation parameters of one example (pixel units; ``cy, cx`` in continuous coordinates,
    pixel ``(i, j)`` covering ``[i, i+1) x [j, j+1)``)."""

    label: int
    cy: float
    cx: float
    half: float
    color: np.ndarray  # float (3,), the shape colour before pixel noise
    dark_background: bool


def _smooth_upsample_matrix(low: int, high: int) -> np.ndarray:
    """(high, low) linear-interpolation matrix mapping ``low`` samples onto ``high`` pixels."""
    pos = (np.arange(high) + 0.5) * low / high - 0.5
    return np.stack([np.interp(pos, np.arange(low), np.eye(low)[k]) for k in range(low)], axis=1)


_UPSAMPLE_8 = _smooth_upsample_matrix(8, IMAGE_SIZE)


def _split_id(split: str) -> int:
    try:
        return SPLIT_IDS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}") from None


def render_example_with_info(split: str, index: int) -> tuple[np.ndarray, ExampleInfo]:
    """Render example ``index`` of ``split``; returns the uint8 (32, 32, 3) image and its params."""
    rng = np.random.default_rng([_split_id(split), int(index)])
    size = IMAGE_SIZE
    label = int(index) % NUM_CLASSES

    dark_bg = bool(rng.random() < 0.5)
    bg_band, fg_band = (DARK_BAND, BRIGHT_BAND) if dark_bg else (BRIGHT_BAND, DARK_BAND)

    # Background: low-frequency colour gradient between two colours of the same band.
    c0, c1 = rng.uniform(*bg_band, size=(2, 3))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    t = (xx * np.cos(theta) + yy * np.sin(theta)) / np.sqrt(2.0) + 0.5
    background = c0 + (c1 - c0) * t[..., None]

    # Texture: random stripes or smooth blotchy noise, zero-mean-ish, in [-amp, amp].
    amp = rng.uniform(*TEXTURE_AMPLITUDE)
    if rng.random() < 0.5:
        phi = rng.uniform(0.0, np.pi)
        cycles = rng.uniform(2.0, 6.0)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        proj = xx * np.cos(phi) + yy * np.sin(phi)
        texture = np.sin(2.0 * np.pi * cycles * proj + phase)
    else:
        low = rng.uniform(-1.0, 1.0, size=(8, 8))
        texture = _UPSAMPLE_8 @ low @ _UPSAMPLE_8.T
        texture /= max(np.abs(texture).max(), 1e-6)
    background = background + amp * texture[..., None]

    # Shape: random size and position (fully inside the image), colour from the other band.
    half = 0.5 * size * rng.uniform(MIN_SIZE_FRAC, MAX_SIZE_FRAC)
    cy, cx = rng.uniform(half, size - half, size=2)
    color = rng.uniform(*fg_band, size=3)

    sub = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    v = ((sub - cy) / half)[:, None]
    u = ((sub - cx) / half)[None, :]
    mask = shape_mask(label, u, v).astype(np.float64)
    alpha = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]

    image = background * (1.0 - alpha) + color * alpha
    image = image + rng.normal(0.0, PIXEL_NOISE_STD, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    info = ExampleInfo(label, float(cy), float(cx), float(half), color, dark_bg)
    return image, info


def render_example(split: str, index: int) -> tuple[np.ndarray, int]:
    """Render example ``index`` of ``split`` ('train'/'test'): (uint8 (32, 32, 3) image, label)."""
    image, info = render_example_with_info(split, index)
    return image, info.label


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for ``synthetic_shapes`` (generated locally; nothing is downloaded)."""

    name = "synthetic_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 10 shape classes, 5000 train / 1000 test."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """Path of this file. Overridden because TFDS's default lookup needs the optional
        ``importlib_resources`` package (absent here) for builders defined outside TFDS."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Procedurally generated 32x32 images of 10 coloured shapes on textured "
                "backgrounds; deterministic and offline."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Return one generator per split; ``dl_manager`` is unused (nothing to download)."""
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str):
        """Yield ``(index, {'image', 'label'})`` for every example of ``split``."""
        for index in range(SPLIT_SIZES[split]):
            image, label = render_example(split, index)
            yield index, {"image": image, "label": label}


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
    """Build ``synthetic_shapes`` into ``data_dir`` unless already prepared; return the builder."""
    builder = SyntheticShapes(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return builder
