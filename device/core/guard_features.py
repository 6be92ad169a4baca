"""The input guard's numbers for an image: :data:`FEATURE_NAMES`, computed by :func:`features`.

Every feature is computed on :func:`device.core.guard_body.body_view`, a 64-pixel view of the body's
bounding box (features v3; v2 saw the whole frame, so a PACS export's square frame of air looked
unlike the tightly cropped training slices). Pure numpy on a few thousand pixels, on the Pi for
every slice: written to make few numpy calls.
"""

from __future__ import annotations

import math

import numpy as np

from device.core.guard_body import OTSU_BINS, _any, _max, _min, _sum, air_level, body_view, otsu_split
from device.core.preprocess import DecodedSlice

FEATURE_VERSION = 3  # 3: features of the body's bounding box; 2: of the whole frame

FEATURE_NAMES = (
    "image_aspect",  # log(width / height) of the body's bounding box (the view every feature is computed on)
    "dark_fraction",  # share of the view darker than 0.2 (air, lungs)
    "bright_fraction",  # share brighter than 0.8
    "mid_fraction",  # share between 0.3 and 0.7 (a lung window leaves few mid greys; photos many)
    "histogram_entropy",  # of a 16-bin histogram, bits
    "otsu_threshold",  # dark/bright split
    "body_fraction",  # share of the view inside the body outline
    "lung_mirror",  # overlap of the dark area enclosed by the body with its mirror image (two lungs: high)
    "wall",  # share of the body's outer rim (2 pixels) that is not dark: the chest wall encloses the lungs
    "lung_fraction",  # dark pixels enclosed by the body / body area
    "lung_core",  # enclosed dark pixels that survive a 1-pixel erosion / body area (not text strokes)
    "lung_balance",  # smaller / larger of the enclosed dark area left and right of the midline
    "lung_lateral",  # share of enclosed dark area outside the middle third of the body
    "lung_centre_row",  # mean row of the enclosed dark area, 0 at the body's top, 1 at its bottom
    "lung_height",  # rows holding enclosed dark area / body height (coronal lungs are tall)
    "lung_bottom_share",  # share of the enclosed dark area in the bottom third of the body
    "lung_darkness",  # mean intensity of the enclosed dark area
    "body_brightness",  # mean intensity of the body's bright part
    "outside_dark",  # share of the outside of the body that is dark (air)
    "corner_dark",  # share of the four corners that is dark
    "border_dark_rows",  # share of the top and bottom border bands that is dark
    "border_dark_columns",  # share of the left and right border bands that is dark
    "symmetry",  # correlation of the body with its mirror image
    "symmetry_vertical",  # correlation of the body with itself upside down (an axial chest: high)
    "edge_density",  # mean gradient magnitude
    "body_texture",  # mean gradient inside the body's bright part (soft tissue is smooth)
    "orientation_entropy",  # of the gradient orientations, bits of 8 bins (buildings: few; anatomy: many)
    "noise_ratio",  # mean |Laplacian| / mean gradient: high for noise
    "colour_fraction",  # share of strongly coloured pixels (0 for grey files)
)


def _span_mask(foreground: np.ndarray, rim: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels between the first and last foreground pixel of their row AND of their column:
    the body outline with its holes (lungs) filled, without a connected-component pass; and
    those of them at least ``rim`` pixels in from those ends (the body less its rim); and which
    rows and columns hold any of it (those that hold foreground: a foreground pixel is inside
    its own row's and column's span, and a row's span holds foreground)."""
    height, width = foreground.shape
    rows, columns = _any(foreground, axis=1), _any(foreground, axis=0)
    # int16 (the view is at most WORK_SIDE a side), minimums in place: fewer, smaller temporaries
    row_first = np.where(rows, foreground.argmax(axis=1), width).astype(np.int16)[:, None]
    row_last = np.where(rows, width - 1 - foreground[:, ::-1].argmax(axis=1), -1).astype(np.int16)[:, None]
    column_first = np.where(columns, foreground.argmax(axis=0), height).astype(np.int16)[None, :]
    column_last = np.where(columns, height - 1 - foreground[::-1].argmax(axis=0), -1).astype(np.int16)[None, :]
    across, down = np.arange(width, dtype=np.int16)[None, :], np.arange(height, dtype=np.int16)[:, None]
    # how far in from the nearest end of its row or column span a pixel is (< 0: outside)
    depth = across - row_first
    np.minimum(depth, row_last - across, out=depth)
    np.minimum(depth, down - column_first, out=depth)
    np.minimum(depth, column_last - down, out=depth)
    return depth >= 0, depth >= rim, rows, columns


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by a 3x3 cross, ``steps`` times (edges count as outside)."""
    for _ in range(steps):
        inner = np.zeros(mask.shape, dtype=bool)
        inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        mask = inner
    return mask


_TAN_EIGHTHS = (float(np.tan(np.pi / 8)), float(np.tan(3 * np.pi / 8)))


def _orientation_bins(gx: np.ndarray, gy: np.ndarray, ax: np.ndarray, ay: np.ndarray) -> np.ndarray:
    """Gradient orientation modulo pi in 8 bins of pi/8 (what floor(atan2(gy, gx) mod pi / (pi/8))
    gives, but from three slope comparisons: atan2 is the costliest step of the features).
    ``ax``, ``ay``: |gx|, |gy|."""
    steep = (
        (ay >= _TAN_EIGHTHS[0] * ax).view(np.int8)
        + (ay >= ax).view(np.int8)
        + (ay >= _TAN_EIGHTHS[1] * ax).view(np.int8)
    )
    # the second and fourth quadrants (and straight up or down) mirror the first: pi - angle
    mirrored = (gy != 0) & (((gx < 0) != (gy < 0)) | (gx == 0))
    return np.where(mirrored, 7 - steep, steep)


def _share(mask: np.ndarray) -> float:
    return np.count_nonzero(mask) / mask.size if mask.size else 0.0


def features(decoded: DecodedSlice) -> np.ndarray:
    """The :data:`FEATURE_NAMES` vector of one decoded image (float64)."""
    grey, aspect = body_view(decoded.pixels)
    height, width = grey.shape
    levels = (grey * OTSU_BINS).astype(np.intp)  # each pixel's histogram bin
    np.minimum(levels, OTSU_BINS - 1, out=levels)
    fine = np.bincount(levels.ravel(), minlength=OTSU_BINS)
    histogram = _sum(fine.reshape(16, OTSU_BINS // 16), axis=1) / grey.size  # bin edges are shared
    nonzero = histogram[histogram > 0]
    threshold = otsu_split(fine)
    foreground = grey > threshold
    # the outline from anything above air: in a soft-tissue window the chest wall is grey fat
    body, body_inner, body_rows, body_columns = _span_mask(grey > air_level(threshold))
    body_area = int(np.count_nonzero(body))
    found = body_area > 0
    body_area = max(1, body_area)
    if found:
        top, bottom = int(body_rows.argmax()), height - int(body_rows[::-1].argmax())
        left, right = int(body_columns.argmax()), width - int(body_columns[::-1].argmax())
    else:
        top, bottom, left, right = 0, height, 0, width
    box_w, box_h = max(1, right - left), max(1, bottom - top)
    # lungs: the dark class of the body's own histogram (air outside does not set the split)
    inside = np.bincount(levels[body], minlength=OTSU_BINS)
    lung_split = otsu_split(inside) if body_area > 16 and np.count_nonzero(inside) > 1 else threshold
    lungs = body & (grey <= lung_split)
    lung_columns = _sum(lungs, axis=0)
    lung_rows = _sum(lungs, axis=1)
    lung_area = int(_sum(lung_rows, axis=None))
    middle = left + box_w / 2.0
    column_centre = np.arange(width) + 0.5
    # the columns whose centre is left of the middle (a half-integer or integer) are a prefix
    left_lung = int(_sum(lung_columns[: min(width, max(0, math.ceil(middle - 0.5)))], axis=None))
    right_lung = lung_area - left_lung
    central = int(_sum(lung_columns[np.abs(column_centre - middle) < box_w / 6.0], axis=None))
    row_position = (np.arange(height) + 0.5 - top) / box_h
    if lung_area:
        lung_centre_row = float(lung_rows @ row_position) / lung_area
        lung_height = np.count_nonzero(lung_rows) / box_h
        lung_bottom = float(_sum(lung_rows[row_position > 2.0 / 3.0], axis=None)) / lung_area
        lung_darkness = float(_sum(grey[lungs], axis=None)) / lung_area
    else:
        lung_centre_row, lung_height, lung_bottom, lung_darkness = 0.5, 0.0, 0.0, 1.0
    solid_mask = body & foreground
    solid_area = int(np.count_nonzero(solid_mask))
    outside = ~body
    outside_area = grey.size - (body_area if found else 0)
    dark = grey < 0.2
    corner = max(2, min(height, width) // 8)
    band = max(1, min(height, width) // 16)
    corners = np.count_nonzero(dark[:corner, :corner]) + np.count_nonzero(dark[:corner, -corner:])
    corners += np.count_nonzero(dark[-corner:, :corner]) + np.count_nonzero(dark[-corner:, -corner:])
    crop = grey[top:bottom, left:right]
    crop_centred = crop - float(_sum(crop, axis=None)) / crop.size
    spread = float(np.vdot(crop_centred, crop_centred))
    symmetry = float(np.vdot(crop_centred, crop_centred[:, ::-1])) / spread if spread > 1e-9 else 1.0
    symmetry_vertical = float(np.vdot(crop_centred, crop_centred[::-1])) / spread if spread > 1e-9 else 1.0
    crop_lungs = lungs[top:bottom, left:right]
    mirrored = crop_lungs[:, ::-1]
    lung_mirror = np.count_nonzero(crop_lungs & mirrored) / max(1, np.count_nonzero(crop_lungs | mirrored))
    rim = body & ~body_inner
    wall = 1.0 - np.count_nonzero(rim & lungs) / max(1, np.count_nonzero(rim))
    gx = grey[:-1, 1:] - grey[:-1, :-1]
    gy = grey[1:, :-1] - grey[:-1, :-1]
    ax, ay = np.abs(gx), np.abs(gy)
    magnitude = ax + ay
    edge = float(_sum(magnitude, axis=None)) / magnitude.size if magnitude.size else 0.0
    solid = solid_mask[:-1, :-1]
    bins = _orientation_bins(gx, gy, ax, ay)
    orientation = np.bincount(bins.ravel(), weights=magnitude.ravel(), minlength=8)
    orientation = orientation[orientation > 0] / max(float(_sum(orientation, axis=None)), 1e-12)
    laplacian = np.abs(grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1])
    colour = 0.0
    if decoded.colour is not None and decoded.colour.size:
        rgb = decoded.colour.astype(np.int16)
        chroma = _max(rgb, axis=2) - _min(rgb, axis=2)
        colour = _share(chroma > 40)
    solid_count = int(np.count_nonzero(solid))
    values = [
        aspect,
        _share(dark),
        _share(grey > 0.8),
        _share((grey > 0.3) & (grey < 0.7)),
        float(-_sum(nonzero * np.log2(nonzero), axis=None)),
        threshold,
        body_area / grey.size if found else 0.0,
        lung_mirror,
        wall,
        lung_area / body_area,
        np.count_nonzero(_erode(lungs, 1)) / body_area,
        min(left_lung, right_lung) / max(1, left_lung, right_lung),
        1.0 - central / max(1, lung_area),
        lung_centre_row,
        lung_height,
        lung_bottom,
        lung_darkness,
        float(_sum(grey[solid_mask], axis=None)) / solid_area if solid_area else 0.0,
        np.count_nonzero(dark & outside) / outside_area if outside_area else 0.0,
        corners / (4 * corner * corner),
        (_share(dark[:band]) + _share(dark[-band:])) / 2,
        (_share(dark[:, :band]) + _share(dark[:, -band:])) / 2,
        symmetry,
        symmetry_vertical,
        edge,
        float(_sum(magnitude[solid], axis=None)) / solid_count if solid_count else 0.0,
        float(-_sum(orientation * np.log2(orientation), axis=None)),
        float(_sum(laplacian, axis=None)) / max(laplacian.size, 1) / max(edge, 1e-6),
        colour,
    ]
    return np.asarray(values, dtype=np.float64)
