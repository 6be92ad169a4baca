"""Images that are not axial chest CT slices, to measure the input guard against.

Built only from what installable packages ship (scikit-image's and scikit-learn's sample
images, matplotlib's and pydicom's sample data) and from synthetic renderings: patterns,
documents, screenshots, and a 3-D chest phantom rendered as a radiograph, coronal and sagittal
reconstructions, plus head and abdominal CT, ultrasound, mammography and fundus look-alikes.
Each category is a function ``(rng, part) -> list[PIL.Image]``; every image then goes through the
device's own decoding (PNG or JPEG bytes), as a file on the appliance would.

Two disjoint parts: ``fit`` (what the guard's discriminant is fitted on) and ``measure`` (what
its figures are measured on). Package sample images are dealt alternately to the two parts, so
no sample image (nor a crop of it) is in both; synthetic renderings use different random
streams per part.
"""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

WORDS = "the patient was admitted with fever cough and dyspnoea chest ct showed bilateral ground glass opacities report table figure results methods".split()


PARTS = ("fit", "measure")


def _share(items: list, part: str | None) -> list:
    """This part's half of a list of sample images (all of them when ``part`` is None)."""
    return list(items) if part is None else list(items)[PARTS.index(part) :: 2]


def _skimage(names: list[str]) -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        log.warning("scikit-image is not installed: its sample images are left out (pip install scikit-image)")
        return []
    images = []
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception as error:  # some sample images need a download; there is no network
            log.info("skimage.data.%s unavailable: %s", name, error)
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float32)
            array = (255 * (array - array.min()) / max(1e-6, float(np.ptp(array)))).astype(np.uint8)
        images.append(Image.fromarray(array[..., :3] if array.ndim == 3 else array))
    return images


def _crops(images: list[Image.Image], rng: np.random.Generator, per_image: int) -> list[Image.Image]:
    out = []
    for image in images:
        out.append(image)
        for _ in range(per_image):
            w, h = image.size
            cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(image.crop((x, y, x + cw, y + ch)))
    return out


def photos(rng, part=None):
    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "colorwheel", "hubble_deep_field", "logo"]
    images = _skimage(names)
    try:
        from sklearn.datasets import load_sample_images

        images += [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            images.append(Image.open(io.BytesIO(handle.read())).convert("RGB"))
    except (ImportError, OSError):
        pass
    return _crops(_share(images, part), rng, 2)


def _faces(count: int) -> list[Image.Image]:
    try:
        from skimage import data

        faces = data.lfw_subset()
    except Exception as error:  # ImportError, or a sample that needs a download
        log.info("skimage.data.lfw_subset unavailable: %s", error)
        return []
    return [Image.fromarray((255 * face).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC) for face in faces[:count]]


def _terrain() -> list[Image.Image]:
    """matplotlib's elevation samples rendered as grey images (aerial-like scenes)."""
    images = []
    try:
        import matplotlib.cbook

        for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
            with np.load(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as archive:
                array = archive[key].astype(np.float32)
            images.append(Image.fromarray((255 * (array - array.min()) / max(1e-6, float(np.ptp(array)))).astype(np.uint8)))
    except (ImportError, OSError, KeyError, ValueError) as error:
        log.info("matplotlib's elevation samples unavailable: %s", error)
    return images


def grey_photos(rng, part=None):
    names = ["camera", "coins", "moon", "grass", "gravel", "brick", "clock", "horse", "cell"]
    images = _share(_skimage(names) + _terrain() + _faces(16), part)
    images += [image.convert("L") for image in photos(np.random.default_rng(int(rng.integers(1 << 30))), part)[::3]]
    return _crops(images, rng, 1)


def _text_page(rng, size=(600, 800), dark=False) -> Image.Image:
    background, ink = (30, 220) if dark else (int(rng.integers(225, 256)), int(rng.integers(0, 60)))
    page = Image.new("L", size, background)
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(10, 60))
    while y < size[1] - 20:
        words = " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(10, 60)), y), words, fill=ink, font_size=int(rng.integers(10, 22)))
        y += int(rng.integers(14, 34))
        if rng.uniform() < 0.1:  # a table rule or a box
            draw.rectangle((20, y, size[0] - 20, y + int(rng.integers(2, 60))), outline=ink)
            y += 64
    return page.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def documents(rng, part=None):
    images = _share(_skimage(["page", "text"]), part)
    images += [_text_page(rng, (int(rng.integers(300, 900)), int(rng.integers(300, 1100))), dark=rng.uniform() < 0.15) for _ in range(20)]
    return images


def screenshots(rng, part=None):
    images = []
    for index in range(20):
        dark = index % 3 == 0
        w, h = int(rng.integers(640, 1400)), int(rng.integers(400, 900))
        bg = (20, 22, 28) if dark else (245, 246, 248)
        shot = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(shot)
        draw.rectangle((0, 0, w, 40), fill=(40, 44, 52) if dark else (225, 228, 232))
        if rng.uniform() < 0.5:
            draw.rectangle((0, 40, int(w * 0.2), h), fill=(32, 34, 40) if dark else (235, 237, 240))
        for _ in range(int(rng.integers(5, 20))):
            x, y = int(rng.integers(0, w - 50)), int(rng.integers(40, h - 20))
            draw.text((x, y), " ".join(rng.choice(WORDS, 4)), fill=(220, 220, 220) if dark else (30, 30, 30), font_size=14)
        for _ in range(int(rng.integers(1, 6))):
            x, y = int(rng.integers(0, w - 120)), int(rng.integers(40, h - 40))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.rectangle((x, y, x + int(rng.integers(60, 300)), y + int(rng.integers(20, 200))), fill=colour)
        images.append(shot if rng.uniform() < 0.6 else shot.convert("L"))
    return images


def _one_over_f(rng, size: int) -> np.ndarray:
    """A random field with a natural image's 1/f amplitude spectrum (clouds, foliage, terrain)."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / size) ** rng.uniform(0.8, 1.6)
    field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.uniform(size=(size, size)))))
    return 255 * (field - field.min()) / max(1e-9, float(np.ptp(field)))


def patterns(rng, part=None):
    size = 256
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(4):
        images.append(np.full((size, size), rng.integers(0, 256), np.float32))
        images.append(rng.uniform(0, 255, (size, size)))
        images.append(np.clip(rng.normal(128, rng.uniform(10, 80), (size, size)), 0, 255))
        angle = rng.uniform(0, np.pi)
        images.append(255 * (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 3)
        images.append(255 * np.clip(1 - np.hypot(xx - rng.uniform(0.3, 0.7), yy - rng.uniform(0.3, 0.7)) * rng.uniform(1, 2), 0, 1))
        period = int(rng.integers(4, 64))
        images.append(255.0 * (((np.arange(size)[:, None] // period) + (np.arange(size)[None, :] // period)) % 2))
        images.append(127 + 127 * np.sin(2 * np.pi * (xx * rng.uniform(1, 20) + yy * rng.uniform(0, 20))))
        blobs = Image.fromarray(rng.uniform(0, 255, (16, 16)).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        images.append(255.0 * (np.asarray(blobs) > 128))
        images.append(_one_over_f(rng, size))
    images = [Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)) for a in images]
    images += _share(_skimage(["checkerboard", "binary_blobs"]), part)
    return images


# -- a 3-D chest phantom: the hard negatives (other views and other body parts) ---------------


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


CATEGORIES = {
    "colour photo": photos,
    "grey photo": grey_photos,
    "document": documents,
    "screenshot": screenshots,
    "pattern": patterns,
    "chest X-ray (synthetic)": chest_xrays,
    "coronal/sagittal CT (synthetic)": coronal_sagittal_ct,
    "head CT (synthetic, phantom)": head_ct,
    "abdominal CT (synthetic)": abdominal_ct,
    "MRI": mri,
    "ultrasound (synthetic)": ultrasound,
    "mammography (synthetic)": mammography,
    "fundus": fundus,
    "histology": histology,
    "dermatoscopy (synthetic)": dermatoscopy,
}


def encode(image: Image.Image, rng) -> bytes:
    """PNG or (a third of the time) JPEG bytes, as such a file would arrive."""
    buffer = io.BytesIO()
    if rng.uniform() < 0.33:
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buffer, format="JPEG", quality=int(rng.integers(70, 95)))
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def negatives(seed: int = 0, part: str | None = "measure") -> dict[str, list[bytes]]:
    """Every category's images of one part (``fit``, ``measure``; None: all sample images) as
    encoded file bytes, deterministic for a seed and part."""
    out = {}
    stream = 0 if part is None else 1 + PARTS.index(part)
    for index, (name, build) in enumerate(CATEGORIES.items()):
        rng = np.random.default_rng([seed, index, stream])
        out[name] = [encode(image, rng) for image in build(rng, part)]
    return out


def write_negatives(folder: Path, seed: int = 0, part: str | None = "measure") -> None:
    """Write the negatives as files, one subfolder per category (to look at them)."""
    for name, files in negatives(seed, part).items():
        sub = Path(folder) / "".join(c if c.isalnum() else "_" for c in name)
        sub.mkdir(parents=True, exist_ok=True)
        for index, data in enumerate(files):
            suffix = "jpg" if data.startswith(b"\xff\xd8\xff") else "png"
            (sub / f"{index:03d}.{suffix}").write_bytes(data)
