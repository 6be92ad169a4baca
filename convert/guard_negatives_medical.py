"""Medical images that are not axial chest CT, as negatives of the input guard: a 3-D chest
phantom rendered as a radiograph and as coronal and sagittal reconstructions, head and abdominal
CT, MRI, and ultrasound, mammography, fundus, histology and dermatoscopy look-alikes. Each is a
category ``(rng, part) -> list[PIL.Image]`` of :mod:`convert.guard_negatives`."""

from __future__ import annotations

import gzip
import logging

import numpy as np
from PIL import Image, ImageFilter

from convert.guard_samples import _crops, _share, _skimage

log = logging.getLogger("convert.guard_negatives")


def _ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0


def chest_volume(rng, depth=96, height=96, width=128) -> np.ndarray:
    """Hounsfield units, z (head to feet) x y (front to back) x x: body, two lungs, heart,
    spine, ribs, and liver below the diaphragm."""
    hu = np.full((depth, height, width), -1000.0, np.float32)
    body_rx, body_ry = width * rng.uniform(0.40, 0.47), height * rng.uniform(0.33, 0.42)
    hu[_ellipsoid(hu.shape, (depth / 2, height / 2, width / 2), (depth * 0.9, body_ry, body_rx))] = 30.0
    lung_top, lung_bottom = depth * rng.uniform(0.05, 0.15), depth * rng.uniform(0.6, 0.75)
    for side in (-1, 1):
        centre = ((lung_top + lung_bottom) / 2, height * 0.47, width / 2 + side * body_rx * 0.45)
        hu[_ellipsoid(hu.shape, centre, ((lung_bottom - lung_top) / 2, body_ry * 0.75, body_rx * 0.38))] = -850.0
    hu[_ellipsoid(hu.shape, (lung_bottom * 0.75, height * 0.42, width * 0.53), (depth * 0.15, body_ry * 0.45, body_rx * 0.3))] = 40.0
    hu[_ellipsoid(hu.shape, (depth * 0.85, height * 0.45, width * 0.45), (depth * 0.2, body_ry * 0.7, body_rx * 0.6))] = 60.0
    spine = _ellipsoid((1, height, width), (0, height / 2 + body_ry * 0.7, width / 2), (1, body_ry * 0.18, body_rx * 0.1))
    hu[:, spine[0]] = 700.0
    outline = _ellipsoid((1, height, width), (0, height / 2, width / 2), (1, body_ry * 0.95, body_rx * 0.95))[0]
    inner = _ellipsoid((1, height, width), (0, height / 2, width / 2), (1, body_ry * 0.88, body_rx * 0.88))[0]
    for z in range(int(lung_top), int(lung_bottom), int(rng.integers(6, 10))):
        hu[z : z + 2][:, outline & ~inner] = 600.0
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    return hu


def _window(hu: np.ndarray, level: float, width: float) -> Image.Image:
    return Image.fromarray(np.clip((hu - level + width / 2) * 255.0 / width, 0, 255).astype(np.uint8))


def _stretch(image: Image.Image, rng) -> Image.Image:
    scale = rng.uniform(2.0, 4.0)
    return image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BILINEAR)


def coronal_sagittal_ct(rng, part=None):
    images = []
    for _ in range(12):
        hu = chest_volume(rng)
        window = (-600, 1500) if rng.uniform() < 0.7 else (40, 400)
        if rng.uniform() < 0.6:
            section = hu[:, int(hu.shape[1] * rng.uniform(0.35, 0.6)), :]
        else:
            section = hu[:, :, int(hu.shape[2] * rng.uniform(0.3, 0.45))]
        images.append(_stretch(_window(section, *window), rng))
    return images


def chest_xrays(rng, part=None):
    images = []
    for _ in range(12):
        hu = chest_volume(rng)
        attenuation = np.clip(hu + 1000.0, 0, None).sum(axis=1)  # front-to-back projection
        projection = 1.0 - np.exp(-attenuation / attenuation.max() * rng.uniform(2.0, 4.0))
        array = (255 * projection / projection.max()).astype(np.uint8)
        image = _stretch(Image.fromarray(array), rng).filter(ImageFilter.GaussianBlur(1.0))
        images.append(image if rng.uniform() < 0.8 else Image.fromarray(255 - np.asarray(image)))
    return images


def _axial_canvas(rng, height=192, width=224):
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx, np.full((height, width), -1000.0, np.float32)


def head_ct(rng, part=None):
    images = _share(_skimage(["shepp_logan_phantom"]), part)
    for _ in range(12):
        yy, xx, hu = _axial_canvas(rng, 224, 224)
        ry, rx = rng.uniform(80, 100), rng.uniform(65, 85)
        r = ((yy - 112) / ry) ** 2 + ((xx - 112) / rx) ** 2
        hu[r <= 1.0] = 1000.0  # skull
        hu[r <= 0.85] = 35.0  # brain
        hu[(((yy - 112) / 18) ** 2 + ((np.abs(xx - 112) - 10) / 6) ** 2) <= 1] = 5.0  # ventricles
        hu += rng.normal(0, 5, hu.shape)
        window = [(40, 80), (-600, 1500), (40, 400)][int(rng.integers(0, 3))]
        images.append(_window(hu, *window))
    return images


def abdominal_ct(rng, part=None):
    images = []
    for _ in range(12):
        yy, xx, hu = _axial_canvas(rng)
        ry, rx = rng.uniform(60, 85), rng.uniform(85, 105)
        body = ((yy - 96) / ry) ** 2 + ((xx - 112) / rx) ** 2 <= 1
        hu[body] = -100.0  # fat
        hu[((yy - 96) / (ry * 0.85)) ** 2 + ((xx - 112) / (rx * 0.85)) ** 2 <= 1] = 40.0
        hu[((yy - 90) / (ry * 0.5)) ** 2 + ((xx - 80) / (rx * 0.4)) ** 2 <= 1] = 60.0  # liver
        hu[((yy - 96 - ry * 0.6) / 12) ** 2 + ((xx - 112) / 10) ** 2 <= 1] = 700.0  # vertebra
        for _bubble in range(int(rng.integers(0, 6))):  # bowel gas
            cy, cx, radius = rng.uniform(70, 120), rng.uniform(70, 160), rng.uniform(3, 9)
            hu[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = -1000.0
        hu += rng.normal(0, 15, hu.shape)
        window = (40, 400) if rng.uniform() < 0.7 else (-600, 1500)
        images.append(_window(hu, *window))
    return images


def mri(rng, part=None):
    images = []
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("s1045.ima.gz") as handle:
            raw = gzip.decompress(handle.read()) if not hasattr(handle, "name") or str(handle.name).endswith(".gz") else handle.read()
        brain = np.frombuffer(raw, np.uint16).astype(np.float32).reshape(256, 256)
        if part != "fit":
            images.append(Image.fromarray((255 * brain / brain.max()).astype(np.uint8)))
    except (ImportError, OSError, ValueError) as error:
        log.info("matplotlib's MRI sample unavailable: %s", error)
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        for name in ("MR_small.dcm",):  # shipped with pydicom; others would need a download
            path = get_testdata_file(name)
            if path and part != "measure":
                array = pydicom.dcmread(path).pixel_array.astype(np.float32)
                array = array[0] if array.ndim == 3 else array
                images.append(Image.fromarray((255 * array / max(1.0, array.max())).astype(np.uint8)))
    except Exception as error:
        log.info("pydicom's MR samples unavailable: %s", error)
    for _ in range(10):  # T1/T2-like brain: grey matter, white matter, CSF bright or dark
        yy, xx, _hu = _axial_canvas(rng, 224, 192)
        r = ((yy - 112) / rng.uniform(85, 100)) ** 2 + ((xx - 96) / rng.uniform(70, 85)) ** 2
        t2 = rng.uniform() < 0.5
        image = np.where(r <= 1.0, 90.0, 0.0) + np.where(r <= 0.8, 40.0, 0.0)
        ventricles = (((yy - 110) / 20) ** 2 + ((np.abs(xx - 96) - 9) / 6) ** 2) <= 1
        image[ventricles] = 230.0 if t2 else 25.0
        image += rng.normal(0, 6, image.shape)
        images.append(_stretch(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), rng))
    return images


def ultrasound(rng, part=None):
    images = []
    for _ in range(12):
        height, width = 300, 400
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = np.arctan2(xx - width / 2, yy + 20)
        radius = np.hypot(xx - width / 2, yy + 20)
        fan = (np.abs(angle) < rng.uniform(0.5, 0.8)) & (radius < height * rng.uniform(0.9, 1.05)) & (radius > 30)
        speckle = rng.rayleigh(40, (height // 2, width // 2))
        speckle = np.asarray(Image.fromarray(speckle.astype(np.float32), "F").resize((width, height)))
        image = np.where(fan, speckle, 0.0)
        for _cyst in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(80, 240), rng.uniform(140, 260), rng.uniform(15, 45)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] *= 0.1
        images.append(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)))
    return images


def mammography(rng, part=None):
    images = []
    for _ in range(12):
        height, width = 400, 300
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        breast = ((yy - height / 2) / (height * rng.uniform(0.4, 0.48))) ** 2 + (xx / (width * rng.uniform(0.6, 0.9))) ** 2 <= 1
        tissue = np.asarray(Image.fromarray(rng.uniform(0, 255, (25, 20)).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        image = np.where(breast, 90 + 0.5 * tissue + 60 * (1 - xx / width), 5.0)
        array = np.clip(image, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(array[:, ::-1] if rng.uniform() < 0.5 else array))
    return images


def fundus(rng, part=None):
    images = _share(_skimage(["retina", "microaneurysms"]), part)
    for _ in range(10):
        size = 300
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        disc = np.hypot(yy - size / 2, xx - size / 2) <= size * 0.45
        red = np.where(disc, 200 - 0.3 * np.hypot(yy - 150, xx - 150), 0)
        optic = np.hypot(yy - 150, xx - rng.uniform(90, 210)) <= 20
        rgb = np.stack([red, red * 0.45, red * 0.15], axis=-1)
        rgb[optic] = (250, 220, 150)
        images.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    return _crops(images, rng, 1)


def histology(rng, part=None):
    # Only images scikit-image ships: the others need pooch and a download, which under pytest
    # becomes a skip (a failure in CI), and on an offline desktop a different negative set.
    images = _share(_skimage(["immunohistochemistry", "cell"]), part)
    for _ in range(10):
        size = 300
        base = np.full((size, size, 3), (235, 200, 225), np.float32)
        yy, xx = np.mgrid[0:size, 0:size]
        for _nucleus in range(int(rng.integers(40, 120))):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 9)
            base[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (90, 60, 160)
        images.append(Image.fromarray(base.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)))
    return _crops(images, rng, 1)


def dermatoscopy(rng, part=None):
    images = []
    for _ in range(12):
        size = 300
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        skin = np.array((220, 170, 150), np.float32) * rng.uniform(0.7, 1.05)
        rgb = np.broadcast_to(skin, (size, size, 3)).copy()
        lesion = ((yy - 150) / rng.uniform(40, 90)) ** 2 + ((xx - 150) / rng.uniform(40, 90)) ** 2 <= 1
        rgb[lesion] = np.array((110, 70, 50)) * rng.uniform(0.6, 1.2)
        vignette = np.hypot(yy - 150, xx - 150) > size * rng.uniform(0.45, 0.7)
        rgb[vignette] = 0
        images.append(Image.fromarray(np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)))
    return images
