"""Re-framing: a slice as a scanner or PACS exports it, from one that is cropped to the body.

The training sources are mostly cropped tightly to the body (sarscov2-ct by its export, covid-ct
by the papers' figures), but a hospital's export is usually a square 512 x 512 frame with a lot
of air around the body, sometimes the scanner table under it, in whatever window the viewer was
set to. The input guard must take both, so its acceptance is measured on each val slice as it is
AND re-framed (and the guard may be fitted on re-framed *train* slices, never on measured ones).

:func:`reframe` pastes a slice, at a random 40-70 % of the frame, into a square frame of air;
optionally turns it a little (a patient lies a few degrees turned on the table: a guard fitted
without turned copies took only 62.8 % of São Paulo's val slices turned by 10 degrees), draws a
table (a bright curved line, sometimes two, under the body) and re-windows the grey levels (a
different window level, width and gamma). Deterministic for a seed. :func:`turned_files` and
:func:`soft_tissue_files` give the guard's other measured (and, soft-tissue, fitted) views.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from device.core.preprocess import LUNG_WINDOW, BadSliceError, decode_slice

FRAME_SIDE = 512
SCALE = (0.4, 0.7)  # the slice's longer side, as a share of the frame's side
TABLE_CHANCE = 0.5
REWINDOW_CHANCE = 0.5
TILT_CHANCE = 0.5
TILT_DEGREES = 12.0  # the largest turn, either way


def _table(canvas: np.ndarray, rng: np.random.Generator, top: int, left: int, height: int, width: int) -> None:
    """Draw a scanner table under the pasted slice: a bright arc wider than the body, a few pixels
    thick, a little below it, sometimes with a fainter second line (the table's lower face)."""
    side = canvas.shape[0]
    half = width * rng.uniform(0.55, 0.75)
    centre = left + width / 2 + rng.uniform(-0.05, 0.05) * width
    base = top + height + rng.uniform(1.0, 0.04 * side)
    sag = rng.uniform(-0.04, 0.04) * side  # > 0: the middle lower than the ends (a cradle seen from the foot)
    brightness = rng.uniform(0.45, 0.9) * 255
    columns = np.arange(max(0, int(centre - half)), min(side, int(centre + half) + 1))
    rows = base + sag * (1 - ((columns - centre) / half) ** 2)
    lines = [(0.0, rng.uniform(2.0, 6.0), brightness)]
    if rng.uniform() < 0.5:
        lines.append((rng.uniform(6.0, 16.0), rng.uniform(1.5, 4.0), brightness * rng.uniform(0.4, 0.8)))
    for offset, thickness, value in lines:
        for column, row in zip(columns, rows + offset, strict=True):
            first, last = int(round(row)), int(round(row + thickness))
            if first < side:
                canvas[max(0, first) : min(side, last), column] = np.maximum(
                    canvas[max(0, first) : min(side, last), column], value
                )


def soft_tissue(pixels: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """A slice in the lung window (``device.core.preprocess.LUNG_WINDOW``, as the training
    sources look) shown in a soft-tissue window of ``level`` and ``width`` HU instead: the
    lungs go black, the chest wall and mediastinum grey, what was above +150 HU stays white."""
    lung_level, lung_width = LUNG_WINDOW
    hounsfield = lung_level - lung_width / 2 + np.asarray(pixels, np.float32) * (lung_width / 255.0)
    return (255.0 * np.clip((hounsfield - (level - width / 2)) / width, 0.0, 1.0)).astype(np.float32)


def _rewindow(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another window: grey levels re-mapped by a random level, width and gamma."""
    low, high, gamma = rng.uniform(0.0, 0.12), rng.uniform(0.82, 1.0), rng.uniform(0.75, 1.35)
    grey = np.clip((pixels / 255.0 - low) / (high - low), 0.0, 1.0)
    return (255.0 * grey**gamma).astype(np.float32)


def _air(pixels: np.ndarray) -> float:
    """The grey level of the slice's own air where its corners show it, else black."""
    corners = np.concatenate(
        [pixels[:4, :4].ravel(), pixels[:4, -4:].ravel(), pixels[-4:, :4].ravel(), pixels[-4:, -4:].ravel()]
    )
    air = float(np.median(corners))
    return air if air < 40 else 0.0


def turn(pixels: np.ndarray, degrees: float, air: float | None = None) -> np.ndarray:
    """``pixels`` turned by ``degrees`` (counter-clockwise), the canvas grown to hold it and
    filled with ``air`` (default: the slice's own, :func:`_air`)."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    fill = _air(pixels) if air is None else air
    return np.asarray(image.rotate(degrees, Image.Resampling.BILINEAR, expand=True, fillcolor=fill), np.float32)


def reframe(
    pixels: np.ndarray,
    rng: np.random.Generator,
    table: bool | None = None,
    rewindow: bool | None = None,
    tilt: bool | None = None,
) -> np.ndarray:
    """``pixels`` (grey 0..255, any size) pasted into a FRAME_SIDE square of air, as uint8.
    ``table``, ``rewindow`` and ``tilt`` (a turn of up to TILT_DEGREES): None draws them at random."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if rewindow if rewindow is not None else rng.uniform() < REWINDOW_CHANCE:
        pixels = _rewindow(pixels, rng)
    air = _air(pixels)  # the frame goes on in the slice's own air
    if tilt if tilt is not None else rng.uniform() < TILT_CHANCE:
        pixels = turn(pixels, rng.uniform(-TILT_DEGREES, TILT_DEGREES), air)
    height, width = pixels.shape
    scale = rng.uniform(*SCALE) * FRAME_SIDE / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(
        Image.fromarray(pixels, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32
    )
    canvas = np.full((FRAME_SIDE, FRAME_SIDE), air, dtype=np.float32)
    spare_h, spare_w = FRAME_SIDE - new_h, FRAME_SIDE - new_w
    top = int(spare_h * rng.uniform(0.25, 0.55))  # bodies sit a little above the middle, over the table
    left = int(spare_w * rng.uniform(0.35, 0.65))
    canvas[top : top + new_h, left : left + new_w] = resized
    if table if table is not None else rng.uniform() < TABLE_CHANCE:
        _table(canvas, rng, top, left, new_h, new_w)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _each_decoded(sources, change, spec=None):
    """PNG bytes of ``change(index, pixels)`` (a uint8 image) for every source (path or bytes),
    a generator: nothing is kept. DICOM is decoded with the bundle's ``spec``. A source that
    does not decode is passed on as it is, so the caller counts it as it would the original."""
    for index, source in enumerate(sources):
        try:
            pixels = decode_slice(source, spec).pixels
        except BadSliceError:  # the caller's decode reports it
            yield source
            continue
        yield png(change(index, pixels))


def _grey(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def soft_tissue_files(sources, spec=None):
    """Every source shown in a soft-tissue window (W400 L40), not re-framed."""
    return _each_decoded(sources, lambda index, pixels: _grey(soft_tissue(pixels)), spec)


def turned_files(sources, degrees: float, spec=None):
    """Every source turned by ``degrees``, the other way for every second one, not re-framed."""
    return _each_decoded(sources, lambda index, pixels: _grey(turn(pixels, degrees if index % 2 == 0 else -degrees)), spec)


def reframed_files(sources, seed: int, spec=None):
    """Every source re-framed, one random framing each from ``seed`` and its index."""
    return _each_decoded(sources, lambda index, pixels: reframe(pixels, np.random.default_rng([seed, index])), spec)
