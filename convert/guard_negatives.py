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

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from convert.guard_negatives_medical import (
    abdominal_ct,
    chest_xrays,
    coronal_sagittal_ct,
    dermatoscopy,
    fundus,
    head_ct,
    histology,
    mammography,
    mri,
    ultrasound,
)
from convert.guard_samples import PARTS, _crops, _share, _skimage

log = logging.getLogger(__name__)

WORDS = "the patient was admitted with fever cough and dyspnoea chest ct showed bilateral ground glass opacities report table figure results methods".split()




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
