"""timm's RandAugment config strings ('rand-m9-mstd0.5-inc1'), parsed without TensorFlow, so
that validating a config needs only the standard library (the ops are in `augment.py`)."""

from __future__ import annotations

import dataclasses
import math
import re

# timm's magnitude scale: magnitude m is the fraction m / 10 of each op's range.
LEVEL_DENOM = 10.0

# timm's default op set, and the one `inc1` selects (severity increasing with magnitude).
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed timm RandAugment string; the defaults are timm's."""

    num_ops: int = 2  # n: ops per image, drawn with replacement.
    magnitude: int = 10  # m: on timm's 0..10 scale.
    magnitude_std: float = 0.0  # mstd: Gaussian noise on m per op; inf: uniform in [0, m].
    magnitude_max: float = 10.0  # mmax: noisy magnitudes are clipped to [0, mmax].
    increasing: bool = False  # inc: use INCREASING_OPS.
    prob: float = 0.5  # p: each drawn op is applied with this probability.

    @property
    def op_names(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


_SECTION = re.compile(r"([a-z]+)(\d.*)")
_SECTION_TYPES = {"n": int, "m": int, "mstd": float, "mmax": int, "inc": int, "p": float}
_EXAMPLE = "e.g. 'rand-m9-mstd0.5-inc1' (sections n<int>, m<int>, mstd, mmax, inc<0|1>, p)"


def parse_randaugment(spec: str) -> RandAugmentConfig:
    """Parses timm's RandAugment config string, e.g. 'rand-n2-m9-mstd0.5-inc1'.

    Sections as in timm: n (ops per image), m (magnitude), mstd (magnitude noise; > 100 means
    uniform in [0, m]), mmax (magnitude clip), inc (increasing op set), p (op probability).
    Stricter than timm: an unknown or repeated section is an error, and 'inc0' means off.
    Raises ValueError with a one-line message.
    """
    head, *sections = spec.split("-")
    if head != "rand":
        raise ValueError(f"{spec!r} is not a RandAugment string: start it with 'rand', {_EXAMPLE}")
    values: dict[str, float] = {}
    for section in sections:
        match = _SECTION.fullmatch(section)
        if match is None or match.group(1) not in _SECTION_TYPES:
            raise ValueError(f"{spec!r}: unknown section {section!r}; {_EXAMPLE}")
        key, text = match.groups()
        if key in values:
            raise ValueError(f"{spec!r}: section {key!r} is given twice")
        try:
            values[key] = _SECTION_TYPES[key](text)
        except ValueError:
            kind = _SECTION_TYPES[key].__name__
            raise ValueError(f"{spec!r}: {section!r} needs an {kind} after {key!r}") from None
    std = values.get("mstd", 0.0)
    config = RandAugmentConfig(
        num_ops=int(values.get("n", 2)),
        magnitude=int(values.get("m", 10)),
        magnitude_std=math.inf if std > 100 else std,
        magnitude_max=values.get("mmax", LEVEL_DENOM),
        increasing=bool(values.get("inc", 0)),
        prob=values.get("p", 0.5),
    )
    if config.magnitude_max <= 0:
        raise ValueError(f"{spec!r}: mmax must be > 0")
    if not 0.0 <= config.prob <= 1.0:
        raise ValueError(f"{spec!r}: p must be in [0, 1]")
    return config
