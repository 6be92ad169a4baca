"""Where the body is, for the input guard: :func:`body_view`, the view every feature is computed on.

**Features v3 see the body, not the frame.** A real axial chest CT slice comes cropped tight to
the body (figures cut from papers, the training sources) or as a scanner or PACS exports it: a
square 512 x 512 frame with a lot of air around the body, often the scanner table as a bright
curved line under it. Shape, histogram and texture computed on the whole frame tell those two
apart more than they tell a chest from a photograph, so the body is found first
(:func:`body_box` on a thumbnail at most :data:`LOCATE_SIDE` pixels a side) and every feature is
computed on a :data:`WORK_SIDE`-pixel view of its bounding box. The body is what is brighter
than air, less the table and separate blobs: the table is a thin line (dropped by a vertical
opening), or parted from the body by a row of air, or, where it touches the body, rows that run
on past the body's sides. A chest wall can be as thin as a table line (a cachectic patient, a
soft-tissue window), so thin lines are dropped only to find the body's rows.

Pure numpy and one small Pillow resize, on the Pi for every slice, so written for speed: one
block reduction of the full image, everything else on thumbnails of a few thousand pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# the reductions ndarray.sum/any/max/min run, called directly: the methods add a Python layer
# (numpy's _methods) to each of the ~40 reductions of a slice, all on small arrays, where that
# layer is a good part of the cost. axis=None where the method would reduce everything.
_sum, _any, _max, _min = np.add.reduce, np.logical_or.reduce, np.maximum.reduce, np.minimum.reduce

LOCATE_SIDE = 128  # the body is found on a thumbnail at most this size: a table line is 1-2 pixels thick
WORK_SIDE = 64  # features are computed on a view of the body's box this size (its longer side)
MIN_BOX = 0.1  # a "body" under this share of the frame's height or width is not one: the whole image is used
COARSE_VIEW = 1.5  # the view is made from the thumbnail when the body spans this many WORK_SIDEs of it, else
# from the full image (a small body in a wide frame has too few thumbnail pixels)
LEVEL_BINS = 256  # histogram that sets the thumbnail's air level
MIN_EDGE_PIXELS = 2  # a row or column at the body's edge holds at least this many pixels above air (not noise)
GAP = 3  # empty thumbnail rows or columns that part the body from something else (a label, a table)

OTSU_BINS = 64
_OTSU_CENTRES = (np.arange(OTSU_BINS) + 0.5) / OTSU_BINS


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The 1st and 99th percentile (nearest rank) of ``values``."""
    flat = values.ravel()
    last = flat.size - 1
    low, high = np.partition(flat, (last // 100, last - last // 100))[[last // 100, last - last // 100]]
    return float(low), float(high)


def stretch(raw: np.ndarray) -> np.ndarray:
    """Grey levels 0..1 between the 1st and 99th percentile: the file's window does not matter."""
    low, high = _percentiles(raw)
    return np.clip((raw - low) * (1.0 / max(high - low, 1e-6)), 0.0, 1.0)


def otsu_split(counts: np.ndarray) -> float:
    """Otsu's split of a histogram of 0..1 in equal bins: the upper edge of the bin that
    maximises the between-class variance."""
    bins = counts.size
    if bins < 2:
        return 0.5
    centres = _OTSU_CENTRES if bins == OTSU_BINS else (np.arange(bins) + 0.5) / bins
    weights = counts / max(1, int(_sum(counts, axis=None)))
    below = weights.cumsum()[:-1]  # ndarray methods, not numpy's Python wrappers: this runs 3 times a slice
    mean_below = (weights * centres).cumsum()
    spread = below * (1.0 - below)
    spread[spread <= 0] = np.inf
    between = (mean_below[-1] * below - mean_below[:-1]) ** 2 / spread
    return float(centres[int(between.argmax())] + 0.5 / bins)


def _air_threshold(sample: np.ndarray) -> float:
    """The intensity above which a thumbnail pixel is not air, from one histogram of ``sample``:
    the 1st and 99th percentile (to a bin) stretch it to 0..1, and the air level of that is the
    features' own (:func:`air_level` of its Otsu split)."""
    least, most = float(_min(sample, axis=None)), float(_max(sample, axis=None))
    if most - least < 1e-6:
        return most
    step = (most - least) / LEVEL_BINS
    scaled = sample - least
    scaled *= 1.0 / step
    index = scaled.astype(np.intp)
    np.minimum(index, LEVEL_BINS - 1, out=index)
    counts = np.bincount(index.ravel(), minlength=LEVEL_BINS)
    cumulative = counts.cumsum()
    total = int(cumulative[-1])
    first = int(cumulative.searchsorted(total // 100, side="right"))
    last = max(first, int(cumulative.searchsorted(total - total // 100, side="left")))
    window = counts[first : last + 1].copy()  # what is outside the percentiles clips to their bins
    window[0] += int(cumulative[first - 1]) if first else 0
    window[-1] += total - int(cumulative[last])
    low, high = least + first * step, least + (last + 1) * step
    return low + air_level(otsu_split(window)) * (high - low)


def air_level(otsu: float) -> float:
    """Grey level (0..1) above which a pixel is not air: in a soft-tissue window the chest wall
    is dark grey fat, so this sits well below the Otsu split."""
    return max(0.08, 0.4 * otsu)


def _block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Means of ``factor`` (>= 2) x ``factor`` blocks (a last partial block row or column is left
    out), by a reduction and strided sums: no resampling, and no copy of the full image unless
    a partial block is cut off."""
    rows, columns = pixels.shape[0] // factor, pixels.shape[1] // factor
    image = pixels[: rows * factor, : columns * factor]
    # one reduction over each block's rows (added in order, as row-by-row adds would be)
    strip = np.add.reduce(image.reshape(rows, factor, columns * factor), axis=1, dtype=np.float32)
    block = strip[:, 0::factor] + strip[:, 1::factor]
    for offset in range(2, factor):
        block += strip[:, offset::factor]
    block *= 1.0 / (factor * factor)
    return block


def _heaviest_run(profile: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the run of non-zero entries of ``profile`` with the largest sum; runs
    parted by fewer than GAP zeros count as one (a tight crop through a lung can leave a column
    with nothing brighter than air between the body and the edge)."""
    filled = profile.nonzero()[0]
    if filled.size == 0:
        return 0, profile.size
    if filled[-1] - filled[0] - filled.size < GAP:  # few zeros between the first and last: maybe one run
        if filled.size == 1 or int(_max(filled[1:] - filled[:-1], axis=None)) <= GAP:
            return int(filled[0]), int(filled[-1]) + 1
    on = np.concatenate(([0], (profile > 0).view(np.int8), [0]))
    edges = (on[1:] != on[:-1]).nonzero()[0]
    starts, stops = edges[::2], edges[1::2]
    if starts.size > 1:
        parted = starts[1:] - stops[:-1] >= GAP
        starts, stops = starts[np.concatenate(([True], parted))], stops[np.concatenate((parted, [True]))]
    if starts.size == 1:
        return int(starts[0]), int(stops[0])
    best = int(np.argmax(np.add.reduceat(profile, starts)))  # each run's sum (the zeros after it add nothing)
    return int(starts[best]), int(stops[best])


def _open_vertically(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` in a vertical run of 3 or more (an opening by a vertical line)."""
    out = np.zeros(mask.shape, dtype=bool)
    core = mask[:-2] & mask[1:-1] & mask[2:]
    out[:-2] |= core
    out[1:-1] |= core
    out[2:] |= core
    return out


def body_box(above_air: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the body in a thumbnail's mask of what is brighter than air:
    the heaviest block of it, less the scanner table under it (a thin line, or a band that runs
    on past the body's sides) and separate blobs (letters, arrows, another panel).

    Thin lines are left out only to find the body's rows: a chest wall in a soft-tissue window
    can be as thin as a table line, and it is what joins the body's sides to the mediastinum."""
    height, width = above_air.shape
    opened = _open_vertically(above_air) if height >= 3 else above_air
    if not _any(opened, axis=None):
        return 0, height, 0, width
    counts = above_air.view(np.uint8)  # sums of uint8 with an int32 accumulator: the fastest count
    top, bottom = _heaviest_run(_sum(opened.view(np.uint8), axis=1, dtype=np.int32))
    left, right = _heaviest_run(_sum(counts[top:bottom], axis=0, dtype=np.int32))
    # a table that touches the body runs on past its sides in the bottom rows: the sides are
    # where there is something above those rows
    upper = _any(above_air[top : bottom - max(3, (bottom - top) // 6), left:right], axis=0)
    if _any(upper, axis=None):
        left, right = left + int(upper.argmax()), right - int(upper[::-1].argmax())
    top, bottom = _heaviest_run(_sum(counts[:, left:right], axis=1, dtype=np.int32))
    if 2 <= left and right <= width - 2:
        beyond = _any(above_air[:, left - 2 : left], axis=1) | _any(above_air[:, right : right + 2], axis=1)
        for _ in range(max(1, height // 16)):
            if bottom - top <= 3 or not beyond[bottom - 1]:
                break
            bottom -= 1
    return top, bottom, left, right


def _edge_cut(filled: np.ndarray) -> int:
    """How many rows (or columns) to cut at a box's edge, given whether each, from the edge
    inwards, holds anything brighter than air: everything up to the innermost one that holds
    nothing. What a line of air parts from the body is not the body (a table, a label, the
    box's rounding)."""
    empty = (~filled).nonzero()[0]
    return int(empty[-1]) + 1 if empty.size else 0


def _trim(
    pixels: np.ndarray, box: tuple[int, int, int, int], band: int, level: float, above: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """The box (in ``pixels``, the full image or the thumbnail; ``band``: its pixels to one of
    the thumbnail's) less what lies at its edges, within a few thumbnail pixels, beyond a row or
    column of air (brighter than ``level`` is not air): the thumbnail's box is rounded outwards,
    and a table or a label closer than GAP thumbnail pixels is in it.
    At the bottom, the top edge of what runs on past a side of the box goes too, with all under
    it: a table line that touches the body (curved, so it may pass one side first).
    ``above``: ``pixels > level`` where the caller has it already (the thumbnail's mask)."""
    top, bottom, left, right = box
    width = pixels.shape[1]
    if bottom - top <= 8 * band or right - left <= 4 * band:
        return box

    def brighter(rows: slice, columns: slice) -> np.ndarray:
        return above[rows, columns] if above is not None else pixels[rows, columns] > level

    depth = 3 * band
    last_rows = slice(bottom - depth, bottom)
    past = np.zeros(depth, dtype=bool)
    if left >= 2 * band:
        past |= _any(brighter(last_rows, slice(left - 2 * band, left)), axis=1)
    if right + 2 * band <= width:
        past |= _any(brighter(last_rows, slice(right, right + 2 * band)), axis=1)
    if _any(past, axis=None):
        bottom -= depth - int(past.argmax())
    reach = min(6 * band, (bottom - top) // 5)
    top += _edge_cut(_any(brighter(slice(top, top + reach), slice(left, right)), axis=1))
    bottom -= _edge_cut(_any(brighter(slice(bottom - reach, bottom), slice(left, right)), axis=1)[::-1])
    reach = min(6 * band, (right - left) // 5)
    left += _edge_cut(_any(brighter(slice(top, bottom), slice(left, left + reach)), axis=0))
    right -= _edge_cut(_any(brighter(slice(top, bottom), slice(right - reach, right)), axis=0)[::-1])
    return top, bottom, left, right


# The last image located, and what was found in it. A slice is located twice on its way to the
# model, by the guard's view (:func:`body_view`) and by preprocessing's crop (:func:`body_crop`),
# always as the same decoded array: the second asks by identity and gets the first's answer.
# One entry (a reference to one decoded slice); a thread that finds another's entry computes its own.
_LAST: tuple[np.ndarray, dict] | None = None


def _remembered(pixels: np.ndarray, key: str, compute):
    """``compute()`` once per decoded array and ``key`` (see ``_LAST``); the arrays handed out
    are read, never written."""
    global _LAST
    last = _LAST
    if last is None or last[0] is not pixels:
        last = (pixels, {})
        _LAST = last
    found = last[1]
    if key not in found:
        found[key] = compute()
    return found[key]


def _locate(pixels: np.ndarray) -> tuple[np.ndarray, int, float, np.ndarray, tuple[int, int, int, int]]:
    """The thumbnail (block means, ``factor`` full pixels a side), its air level, its mask of
    what is brighter than air and the body's box in it (:func:`body_box`, untrimmed)."""
    return _remembered(pixels, "locate", lambda: _locate_now(pixels))


def _locate_now(pixels: np.ndarray) -> tuple[np.ndarray, int, float, np.ndarray, tuple[int, int, int, int]]:
    height, width = pixels.shape
    factor = max(1, min(-(-max(height, width) // LOCATE_SIDE), min(height, width) // 8))
    coarse = _block_mean(pixels, factor) if factor > 1 else pixels
    air = _air_threshold(coarse[::2, ::2] if coarse.size > 8192 else coarse)  # a quarter of it is enough
    above_air = coarse > air
    return coarse, factor, air, above_air, body_box(above_air)


def body_view(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The body's bounding box as a view at most WORK_SIDE pixels a side (box filter), grey
    0..1, and the box's log(width / height). A slice cropped tight to the body and the same
    slice in a scanner's square frame, air and a table around it, give about the same view."""
    pixels = np.asarray(pixels, dtype=np.float32)
    height, width = pixels.shape
    coarse, factor, air, above_air, box = _locate(pixels)
    if factor == 1 or max(box[1] - box[0], box[3] - box[2]) >= COARSE_VIEW * WORK_SIDE:
        # a body that fills most of the frame: the thumbnail has pixels enough for the view
        source = coarse
        if box != (0, coarse.shape[0], 0, coarse.shape[1]):
            box = _trim(coarse, box, 1, air, above_air)
    else:  # a small body in a wide frame has few thumbnail pixels: the view is made from the full image
        source = pixels
        top, bottom, left, right = box
        bottom = height if bottom == coarse.shape[0] else bottom * factor
        right = width if right == coarse.shape[1] else right * factor
        box = _trim(pixels, (top * factor, bottom, left * factor, right), factor, air)
    top, bottom, left, right = box
    box_h, box_w = bottom - top, right - left
    if box_h < MIN_BOX * source.shape[0] or box_w < MIN_BOX * source.shape[1]:
        top, bottom, left, right = 0, source.shape[0], 0, source.shape[1]
        box_h, box_w = source.shape
    shrink = min(1.0, WORK_SIDE / max(box_h, box_w))
    size = (max(1, round(box_w * shrink)), max(1, round(box_h * shrink)))
    if size == (box_w, box_h):
        view = source[top:bottom, left:right]
    else:
        image = Image.frombuffer(
            "F", (source.shape[1], source.shape[0]), np.ascontiguousarray(source), "raw", "F", 0, 1
        )
        resized = image.resize(size, Image.Resampling.BOX, box=(left, top, right, bottom))
        view = np.frombuffer(resized.tobytes(), dtype=np.float32).reshape(size[1], size[0])
    return stretch(view), math.log(box_w / box_h)


def body_crop(pixels: np.ndarray, table: bool = False) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), in full-image pixels, of the box that holds the body and
    nothing beyond it: what preprocessing versions 2 and 3 crop every slice to before letterboxing.

    Why: both training sources come cropped to the body's edges (São Paulo by its export,
    COVID-CT by the papers' figures), so a model learns slices that the body fills. A scanner or
    PACS export is a square frame with air and a table around a body that fills 40-70 % of it;
    letterboxed whole, the same São Paulo val slices scored at chance (ROC AUC 0.53 against
    0.96). The box is :func:`body_box` on the thumbnail, trimmed like the guard's view, then
    each edge moved, within one thumbnail pixel either way, to the outermost full-resolution row
    or column holding at least MIN_EDGE_PIXELS pixels brighter than air (a box rounded to the
    thumbnail's blocks keeps a band of air that a model trained on tight crops notices). A body
    that touches the image's edges (most training slices) gives the whole image, which is then
    passed on unchanged; so does a "body" too small to be one.

    ``table`` (preprocessing version 3): leave out a scanner table that touches the body, which
    the thumbnail's box keeps (on São Paulo val slices framed with a table, the version-2 box
    was off the slice by more than 3 pixels on 56 of 137, mostly the table under it and its
    width past the body's sides). The columns are found in the box's upper five sixths only
    (a table is wider than the body, and lies under it), the bottom edge is not moved past the
    thumbnail's box, and the refined box is trimmed again at full resolution (the table's
    thin line goes). Frames of air give the same box as version 2."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return _remembered(pixels, "crop-table" if table else "crop", lambda: _body_crop_now(pixels, table))


def _body_crop_now(pixels: np.ndarray, table: bool = False) -> tuple[int, int, int, int]:
    height, width = pixels.shape
    coarse, factor, air, above_air, box = _locate(pixels)
    whole = (0, height, 0, width)
    if box == (0, coarse.shape[0], 0, coarse.shape[1]):
        return whole
    top, bottom, left, right = _trim(coarse, box, 1, air, above_air)
    if factor > 1:
        low_row, high_row = max(0, (top - 1) * factor), height if bottom >= coarse.shape[0] else min(height, (bottom + 1) * factor)
        low_col, high_col = max(0, (left - 1) * factor), width if right >= coarse.shape[1] else min(width, (right + 1) * factor)
        above = pixels[low_row:high_row, low_col:high_col] > air
        rows = _sum(above.view(np.uint8), axis=1, dtype=np.int32) >= MIN_EDGE_PIXELS
        upper = above[: max(1, (bottom - top) * factor * 5 // 6 + top * factor - low_row)] if table else above
        columns = _sum(upper.view(np.uint8), axis=0, dtype=np.int32) >= MIN_EDGE_PIXELS
        thumbnail_bottom = height if bottom >= coarse.shape[0] else bottom * factor
        top, bottom = _refined(rows, low_row, top * factor, bottom * factor, factor)
        left, right = _refined(columns, low_col, left * factor, right * factor, factor)
        if table:
            bottom = min(bottom, thumbnail_bottom)
            top, bottom, left, right = _trim(pixels, (top, bottom, left, right), factor, air)
    if bottom - top < MIN_BOX * height or right - left < MIN_BOX * width:
        return whole
    return top, min(bottom, height), left, min(right, width)



def _refined(filled: np.ndarray, offset: int, start: int, stop: int, factor: int) -> tuple[int, int]:
    """[start, stop) (full pixels, from the thumbnail's box) moved to the first and last
    ``filled`` entry (``filled[0]`` is pixel ``offset``) within ``factor`` pixels of each edge;
    an edge with none there stays where it was."""
    first = max(0, start - factor - offset)
    near_start = filled[first : max(0, start + factor - offset)]
    if _any(near_start, axis=None):
        start = offset + first + int(near_start.argmax())
    last = max(0, stop - factor - offset)
    near_stop = filled[last : stop + factor - offset]
    if _any(near_stop, axis=None):
        stop = offset + last + near_stop.size - int(near_stop[::-1].argmax())
    return start, stop
