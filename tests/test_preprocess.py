"""The preprocessing contract: known outputs for known inputs, whatever the file's mode or
encoding, and one well-named error for every kind of bad file."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from device.core.guard_body import body_crop
from device.core.phantom import chest_png
from device.core.preprocess import BadSliceError, PreprocessSpec, crop_box, decode_slice, load_slice, prepare

# steps 4-6 (letterbox, stretch, rounding) on their own: the body crop (step 3b) has its tests below
SPEC = PreprocessSpec(height=32, width=32, channels=1, crop="none")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def grey_ramp(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth 8-bit pattern with every value 0..255 present."""
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx * 255 // (width - 1) + yy * 7) % 256).astype(np.uint8)


def test_two_level_slice_maps_to_black_and_white_exactly():
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, 16:] = 100
    out = load_slice(encode(Image.fromarray(pixels)), SPEC)
    assert out.shape == (32, 32, 1) and out.dtype == np.uint8
    assert (out[:, :16, 0] == 0).all() and (out[:, 16:, 0] == 255).all()


def test_letterbox_keeps_aspect_ratio_and_pads_black():
    wide = np.full((16, 64), 200, np.uint8)
    wide[:, ::2] = 50  # texture so the stretch has a range
    out = load_slice(encode(Image.fromarray(wide)), SPEC)[:, :, 0]
    # 64x16 scaled by 0.5 -> 32x8, centred: rows 12..19 hold the image, the rest is padding
    assert (out[:12] == 0).all() and (out[20:] == 0).all()
    assert out[12:20].max() > 0


def test_every_mode_of_the_same_picture_gives_the_same_input():
    grey = grey_ramp()
    reference = load_slice(encode(Image.fromarray(grey, "L")), SPEC)
    rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    variants = {
        "RGB": rgb,
        "RGBA opaque": rgb.convert("RGBA"),
        "palette": Image.fromarray(grey, "L").convert("P"),
        "16-bit": Image.fromarray(grey.astype(np.uint16) * 257),
        "LA": Image.fromarray(grey, "L").convert("LA"),
    }
    for name, image in variants.items():
        out = load_slice(encode(image), SPEC)
        assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1, name


def test_sixteen_bit_slices_keep_their_precision():
    """12-bit data in a 16-bit PNG (values 0..4095, all below 256 after a naive 8-bit cut)
    must come out with full contrast, not black."""
    ramp = (grey_ramp().astype(np.uint16) * 16)  # 0..4080
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    decoded = decode_slice(encode(image))
    assert decoded.pixels.max() == pytest.approx(4080)
    out = prepare(decoded.pixels, SPEC)
    reference = load_slice(encode(Image.fromarray(grey_ramp())), SPEC)
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


def test_transparent_pixels_become_black():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 16:, 3] = 255  # left half transparent white, right half opaque white
    decoded = decode_slice(encode(Image.fromarray(rgba, "RGBA")))
    assert (decoded.pixels[:, :16] == 0).all() and (decoded.pixels[:, 16:] == 255).all()


def test_colour_becomes_luma():
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    assert decode_slice(encode(red)).pixels[0, 0] == pytest.approx(76)  # ITU-R 601-2: 0.299 * 255


def test_jpeg_named_png_is_decoded_by_content(tmp_path):
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(encode(Image.fromarray(grey_ramp()), "JPEG", quality=95))
    decoded = decode_slice(path)
    assert decoded.format == "JPEG"
    assert load_slice(path, SPEC).shape == (32, 32, 1)


def test_three_channel_spec_repeats_the_grey_channel():
    out = load_slice(encode(Image.fromarray(grey_ramp())), PreprocessSpec(height=32, width=32, channels=3))
    assert out.shape == (32, 32, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_constant_image_is_black_not_a_division_by_zero():
    out = load_slice(encode(Image.new("L", (40, 40), 128)), SPEC)
    assert (out == 0).all()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (a decompression-bomb shape)."""
    small = encode(Image.new("L", (16, 16)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return patched + small[8 + 4 + 4 + 13 + 4 :]


@pytest.mark.parametrize(
    "name, payload, reason",
    [
        ("zero bytes", b"", "empty"),
        ("text renamed .png", b"patient list\nnot an image\n", "not-an-image"),
        ("truncated PNG", encode(Image.fromarray(grey_ramp(256, 256)))[:400], "truncated"),
        ("1x1", encode(Image.new("L", (1, 1))), "too-small"),
        ("30000x30000 header", png_with_declared_size(30000, 30000), "too-large"),
        ("GIF", encode(Image.new("L", (32, 32)), "GIF"), "unsupported-format"),
        ("random bytes", bytes(range(256)) * 4, "not-an-image"),
    ],
)
def test_bad_files_raise_one_error_type_with_a_reason(tmp_path, name, payload, reason):
    path = tmp_path / "slice.png"
    path.write_bytes(payload)
    with pytest.raises(BadSliceError) as caught:
        load_slice(path, SPEC)
    assert caught.value.reason == reason, name
    assert str(caught.value)  # a sentence for a person


def test_missing_file_and_directory_are_bad_slices(tmp_path):
    with pytest.raises(BadSliceError) as missing:
        load_slice(tmp_path / "gone.png", SPEC)
    assert missing.value.reason == "missing"
    with pytest.raises(BadSliceError) as folder:
        load_slice(tmp_path, SPEC)
    assert folder.value.reason == "not-a-file"


def test_dicom_ct_slice_is_windowed_to_the_lung_window():
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("CT_small.dcm")
    decoded = decode_slice(path)
    assert decoded.format == "DICOM"
    assert decoded.pixels.shape == (128, 128)
    assert 0 <= decoded.pixels.min() and decoded.pixels.max() <= 255
    assert load_slice(path, SPEC).shape == (32, 32, 1)


def test_spec_round_trips_through_the_manifest_and_refuses_other_versions():
    spec = PreprocessSpec(height=160, width=160, channels=1)
    assert spec.version == 3 and spec.crop == "body"
    assert PreprocessSpec.from_manifest(spec.to_manifest()) == spec
    data = spec.to_manifest() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        PreprocessSpec.from_manifest(data)
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        PreprocessSpec.from_manifest(spec.to_manifest() | {"gamma": 2.2})
    with pytest.raises(ValueError, match="needs crop"):
        PreprocessSpec.from_manifest({k: v for k, v in spec.to_manifest().items() if k != "crop"})


def test_a_version_1_manifest_still_loads_and_never_crops():
    """Bundles made before the body crop keep the preprocessing they were trained with."""
    old = {k: v for k, v in PreprocessSpec(height=160, width=160, channels=1).to_manifest().items() if k != "crop"}
    old["version"] = 1
    spec = PreprocessSpec.from_manifest(old)
    assert spec.version == 1 and spec.crop == "none"
    assert spec.to_manifest() == old  # written back as it was read: no crop field
    with pytest.raises(ValueError, match="version 1 has no crop"):
        PreprocessSpec.from_manifest(old | {"crop": "body"})
    with pytest.raises(ValueError, match="version 1 does not crop"):
        PreprocessSpec(version=1)


# -- step 3b: the body crop ---------------------------------------------------------------------


def _framed(tight: np.ndarray, side: int, top: int, left: int, table: bool) -> np.ndarray:
    """``tight`` pasted into a ``side`` square of air, optionally with a bright table line under it."""
    frame = np.zeros((side, side), np.float32)
    frame[top : top + tight.shape[0], left : left + tight.shape[1]] = tight
    if table:
        row = top + tight.shape[0] + 6
        frame[row : row + 3, max(0, left - 20) : left + tight.shape[1] + 20] = 160.0
    return frame


def test_a_slice_framed_in_air_with_a_table_gives_the_input_of_the_slice_cropped_to_the_body():
    """A scanner export (the body small in a square of air, the table under it) and the same slice
    cropped to the body (how both training sources come) become the same model input."""
    spec = PreprocessSpec(height=64, width=64, channels=1)
    whole = decode_slice(chest_png(seed=3)).pixels  # the phantom: air around the body, a table line
    top, bottom, left, right = body_crop(whole)
    assert bottom - top < whole.shape[0] and right - left <= whole.shape[1]
    # the body at about a São Paulo export's size, so that it can be framed at any place
    tight = np.asarray(Image.fromarray(whole[top:bottom, left:right], mode="F").resize((300, 230)), np.float32)
    reference = prepare(tight, spec)
    assert np.array_equal(reference, prepare(tight, PreprocessSpec(height=64, width=64, channels=1, crop="none")))
    for side, at_top, at_left, table in ((512, 90, 120, True), (420, 30, 10, False), (640, 200, 250, True)):
        framed = _framed(tight, side, at_top, at_left, table)
        cropped = prepare(framed, spec).astype(int)
        uncropped = prepare(framed, PreprocessSpec(height=64, width=64, channels=1, crop="none")).astype(int)
        assert np.abs(cropped - reference).mean() < 2.0, (side, at_top, at_left, table)
        assert np.abs(uncropped - reference).mean() > 20.0  # what version 1 gave the model instead


def test_the_body_crop_holds_the_body_and_drops_the_air_and_the_table():
    whole = decode_slice(chest_png(seed=5)).pixels  # air is grey 59 in the lung window, fat 212
    top, bottom, left, right = body_crop(whole)
    body = whole[top:bottom, left:right] > 100
    # every edge of the box touches the body; nothing bright is left outside it but the table under it
    assert body[0].sum() >= 2 and body[-1].sum() >= 2 and body[:, 0].sum() >= 2 and body[:, -1].sum() >= 2
    outside = whole > 100
    outside[top:bottom, left:right] = False
    assert outside[:bottom].sum() <= 4  # noise at most; the table line lies below the box
    assert outside[bottom:].sum() > 100


def _touching_table(tight: np.ndarray, side: int, top: int, left: int) -> np.ndarray:
    """``tight`` in a ``side`` square of air on a table that touches it: a bright band right under
    the body, wider than it on both sides (how a scanner exports a patient lying on the table)."""
    frame = _framed(tight, side, top, left, table=False)
    row = top + tight.shape[0]
    frame[row : row + 4, max(0, left - 40) : left + tight.shape[1] + 40] = 160.0
    return frame


def test_version_3_leaves_out_a_table_that_touches_the_body_and_version_2_bundles_keep_their_crop():
    """A table line right under the body is joined to it on the thumbnail: version 2's box keeps
    it (and its width past the body's sides), version 3's is the slice alone; a version-2
    manifest still gets version 2's box, so bundles made with it see what they were trained on."""
    whole = decode_slice(chest_png(seed=3)).pixels
    top, bottom, left, right = body_crop(whole)
    tight = np.asarray(Image.fromarray(whole[top:bottom, left:right], mode="F").resize((300, 230)), np.float32)
    v3 = PreprocessSpec(height=64, width=64, channels=1)
    v2 = PreprocessSpec.from_manifest(v3.to_manifest() | {"version": 2})
    reference = prepare(tight, v3)
    for side, at_top, at_left in ((512, 90, 120), (512, 200, 60), (600, 150, 180)):
        framed = _touching_table(tight, side, at_top, at_left)
        truth = (at_top, at_top + tight.shape[0], at_left, at_left + tight.shape[1])
        new_box = crop_box(framed, v3)
        old_box = crop_box(framed, v2)
        assert max(abs(a - b) for a, b in zip(new_box, truth, strict=True)) <= 3, (new_box, truth)
        assert max(abs(a - b) for a, b in zip(old_box, truth, strict=True)) > 3, (old_box, truth)
        assert np.abs(prepare(framed, v3).astype(int) - reference).mean() < 5.0
        assert np.abs(prepare(framed, v2).astype(int) - reference).mean() > 15.0  # the table in the input
    # a frame of air alone: the same box either way
    framed = _framed(tight, 512, 90, 120, table=False)
    assert crop_box(framed, v3) == crop_box(framed, v2)


def test_a_body_that_fills_the_image_and_an_image_without_one_are_left_whole():
    spec_none = PreprocessSpec(height=32, width=32, channels=1, crop="none")
    spec_body = PreprocessSpec(height=32, width=32, channels=1)
    whole = decode_slice(chest_png(seed=2)).pixels
    top, bottom, left, right = body_crop(whole)
    tight = whole[top:bottom, left:right]
    assert body_crop(tight) == (0, tight.shape[0], 0, tight.shape[1])
    noise = np.random.default_rng(0).uniform(0, 255, (80, 90)).astype(np.float32)
    flat = np.full((40, 50), 7.0, np.float32)
    for image in (tight, noise, flat, grey_ramp().astype(np.float32)):
        assert np.array_equal(prepare(image, spec_body), prepare(image, spec_none))


def test_the_guard_and_the_crop_find_the_body_once_per_decoded_slice(monkeypatch):
    """Preprocessing finds the body before the guard is timed, and the guard's view reuses it: the
    guard adds only its own features to a slice's time. Another array, even with the same pixels,
    is located again: what is remembered is tied to the decoded slice, not to its content."""
    from device.core import guard_body
    from device.core.guard import features
    from device.core.preprocess import crop_box

    calls = []
    real = guard_body._locate_now
    monkeypatch.setattr(guard_body, "_locate_now", lambda pixels: calls.append(1) or real(pixels))
    spec = PreprocessSpec(height=64, width=64, channels=1)
    decoded = decode_slice(chest_png(seed=4))
    box = crop_box(decoded.pixels, spec)
    values = features(decoded)
    prepared = prepare(decoded.pixels, spec)
    assert len(calls) == 1
    copy = decoded.pixels.copy()
    assert crop_box(copy, spec) == box and len(calls) == 2
    assert np.array_equal(features(decode_slice(chest_png(seed=4))), values)
    assert np.array_equal(prepare(copy, spec), prepared)
    assert crop_box(decoded.pixels, PreprocessSpec(height=64, width=64, channels=1, crop="none")) is None
