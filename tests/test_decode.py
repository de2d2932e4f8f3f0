"""Decoding: formats, channel conversion, resizing, masks, preprocessing, labels, the bomb guard."""
import io

import numpy as np
import pytest
from PIL import Image

from beam_pipeline.io import decode
from beam_pipeline.errors import ExampleError, OptionError


def _encode(array, fmt="PNG", mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


RGB = decode.ImageSpec(8, 10, 3, "none")
GRAY = decode.ImageSpec(8, 10, 1, "none")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_formats_decode_and_resize_to_model_size(fmt):
    image = np.full((30, 40, 3), 200, np.uint8)
    out = decode.decode_image(_encode(image, fmt), RGB)
    assert out.shape == (8, 10, 3) and out.dtype == np.float32
    assert np.allclose(out, 200, atol=3)  # JPEG is lossy


def test_channel_conversions():
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    as_rgb = decode.decode_image(_encode(gray), RGB)
    np.testing.assert_array_equal(as_rgb[..., 0], gray)
    np.testing.assert_array_equal(as_rgb[..., 2], gray)

    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    np.testing.assert_array_equal(decode.decode_image(_encode(rgba), RGB)[0, 0], [255, 0, 0])

    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 1] = 100
    to_gray = decode.decode_image(_encode(rgb), GRAY)
    assert to_gray.shape == (8, 10, 1)
    assert to_gray[0, 0, 0] == pytest.approx(100 * 0.587, abs=1)  # ITU-R 601 luma


def test_sixteen_bit_gray_keeps_range():
    deep = np.full((8, 10), 65535, np.uint16)
    out = decode.decode_image(_encode(deep), RGB)
    assert np.allclose(out, 255.0, atol=0.01)


def test_preprocess_modes():
    pixels = np.full((1, 1, 3), 255.0, np.float32)
    assert decode.preprocess(pixels, "unit").max() == 1.0
    assert decode.preprocess(pixels * 0, "symmetric").min() == -1.0
    np.testing.assert_allclose(decode.preprocess(pixels, "caffe")[0, 0],
                               255 - np.array([103.939, 116.779, 123.68]), rtol=1e-6)
    np.testing.assert_allclose(decode.preprocess(pixels, "torch")[0, 0],
                               (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                               rtol=1e-6)
    with pytest.raises(OptionError):
        decode.ImageSpec(8, 8, 1, "caffe")


def test_mask_resized_with_nearest_neighbour_stays_binary():
    mask = np.zeros((16, 20), np.uint8)
    mask[:8, :10] = 255
    out = decode.decode_mask(_encode(mask), RGB)
    assert out.dtype == bool and out.shape == (8, 10)
    assert out[:4, :5].all() and not out[4:, :].any()


@pytest.mark.parametrize(
    "data,error_type",
    [(b"", "empty_image"), (b"not an image at all", "corrupt_image")],
)
def test_bad_bytes_are_example_errors(data, error_type):
    with pytest.raises(ExampleError) as info:
        decode.decode_image(data, RGB)
    assert info.value.error_type == error_type and info.value.stage == "decode"


def test_truncated_png_is_corrupt_image():
    data = _encode(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ExampleError) as info:
        decode.decode_image(data[: len(data) // 2], RGB)
    assert info.value.error_type == "corrupt_image"


def test_decompression_bomb_refused_before_decoding():
    # 9000 x 9000 one-bit pixels: ~10 kB of PNG that would decode to 81 M pixels.
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ExampleError) as info:
        decode.decode_image(bomb.getvalue(), RGB)
    assert info.value.error_type == "image_too_large"
    small_budget = decode.ImageSpec(8, 10, 3, "none", max_image_pixels=100)
    with pytest.raises(ExampleError, match="budget"):
        decode.decode_image(_encode(np.zeros((20, 20), np.uint8)), small_budget)


@pytest.mark.parametrize(
    "raw,expected",
    [(1, 1), ("2", 2), (" b ", 1), (2.0, 2), (b"c", 2), (np.int64(0), 0)],
)
def test_parse_label_accepts_indices_and_names(raw, expected):
    assert decode.parse_label(raw, ["a", "b", "c"]) == expected


@pytest.mark.parametrize("raw", [None, "", "  ", float("nan"), b""])
def test_parse_label_empty_is_unlabeled(raw):
    assert decode.parse_label(raw, ["a", "b", "c"]) is None


@pytest.mark.parametrize(
    "raw,error_type",
    [(3, "label_out_of_range"), (-1, "label_out_of_range"), ("zebra", "unknown_label"),
     (1.5, "unknown_label")],
)
def test_parse_label_rejects(raw, error_type):
    with pytest.raises(ExampleError) as info:
        decode.parse_label(raw, ["a", "b", "c"])
    assert info.value.error_type == error_type and info.value.stage == "label"
