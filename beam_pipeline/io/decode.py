"""Bytes → model-ready arrays: image decoding, channel conversion, resizing, preprocessing, labels.

Everything here is plain Python/NumPy/Pillow and raises ``ExampleError`` for a bad example, so the
Beam layer only has to turn those into error rows.
"""
import io
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ExampleError, OptionError
from .records import DecodedExample, ExampleRef

SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP")
PREPROCESS_MODES = ("none", "unit", "symmetric", "caffe", "torch")
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a decompression bomb is far larger

_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# Pillow's own bomb check only warns below 2x its limit; ours refuses before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes: ``height`` x ``width`` x ``channels``, and how pixels are scaled."""

    height: int
    width: int
    channels: int
    preprocess: str = "unit"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise OptionError(
                f"--preprocess {self.preprocess!r} is not one of {', '.join(PREPROCESS_MODES)}."
            )
        if self.channels not in (1, 3):
            raise OptionError(
                f"The model takes {self.channels}-channel images; xai-audit decodes images to 1 "
                "(grayscale) or 3 (RGB) channels. Wrap the model so its input is 1 or 3 channels."
            )
        if self.preprocess in ("caffe", "torch") and self.channels != 3:
            raise OptionError(
                f"--preprocess {self.preprocess} needs a 3-channel (RGB) model; this model takes "
                f"{self.channels} channel(s). Use --preprocess unit, symmetric or none."
            )


def _open_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ExampleError("decode", f"empty_{what}", f"The {what} file is empty (0 bytes).")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ExampleError(
            "decode",
            f"corrupt_{what}" if what == "mask" else "corrupt_image",
            f"Not a readable {'/'.join(SUPPORTED_FORMATS)} {what}: the bytes are corrupt or of "
            "another format.",
        ) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ExampleError(
            "decode",
            "image_too_large",
            f"The {what} is {w}x{h} = {w * h:,} pixels, above the budget of {max_pixels:,} "
            "(a guard against decompression bombs); raise --max-image-pixels if it is genuine.",
        )
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt pixel data surfaces only on load
        raise ExampleError(
            "decode",
            f"corrupt_{what}" if what == "mask" else "corrupt_image",
            f"The {what} could not be decoded ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt.",
        ) from None
    return img


def _to_float_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize (bilinear) and convert to float32 [H, W, C] with values in 0..255."""
    size = (spec.width, spec.height)
    if img.mode in _SIXTEEN_BIT_MODES:
        # High bit-depth grayscale (common in medical imaging): keep precision, rescale to 0..255.
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        resized = Image.fromarray(arr * scale, mode="F").resize(size, Image.BILINEAR)
        gray = np.asarray(resized, dtype=np.float32)[..., None]
        return gray if spec.channels == 1 else np.repeat(gray, 3, axis=-1)
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if spec.channels == 1:
        img = img.convert("L")  # RGB/RGBA → luminance
    else:
        img = img.convert("RGB")  # gray → RGB by replication; RGBA → RGB drops alpha
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    return arr[..., None] if arr.ndim == 2 else arr


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Scale 0..255 pixels the way the model was trained (``--preprocess``)."""
    if mode == "none":
        return pixels
    if mode == "unit":
        return pixels / 255.0
    if mode == "symmetric":
        return pixels / 127.5 - 1.0
    if mode == "caffe":
        return pixels[..., ::-1] - _CAFFE_BGR_MEAN
    if mode == "torch":
        return (pixels / 255.0 - _TORCH_MEAN) / _TORCH_STD
    raise OptionError(f"Unknown --preprocess mode {mode!r}.")


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Image bytes → float32 [H, W, C], converted, resized and preprocessed."""
    img = _open_image(data, "image", spec.max_image_pixels)
    return preprocess(_to_float_array(img, spec), spec.preprocess).astype(np.float32)


def decode_mask(data: bytes, spec: ImageSpec,
                image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Mask bytes → bool [H, W] at model resolution (nearest neighbour keeps it binary).

    With ``image_size`` (the image's own width, height), a mask of another size is refused
    (``mask_size_mismatch``): resizing both to the model's input would silently misplace it."""
    img = _open_image(data, "mask", spec.max_image_pixels)
    if image_size is not None and img.size != tuple(image_size):
        raise ExampleError(
            "decode", "mask_size_mismatch",
            f"The mask is {img.size[0]}x{img.size[1]} pixels but its image is "
            f"{image_size[0]}x{image_size[1]} (width x height); a mask must cover its image "
            "pixel for pixel.")
    try:
        if img.mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr > 0).astype(np.uint8) * 255, mode="L")
        else:
            img = img.convert("L")
        img = img.resize((spec.width, spec.height), Image.NEAREST)
    except Exception as exc:
        raise ExampleError("decode", "corrupt_mask", f"The mask could not be converted: {exc}")
    return np.asarray(img) > 0


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, (str, bytes)) and not value.strip():
        return True
    return False


def parse_label(raw: Any, class_names: Sequence[str]) -> Optional[int]:
    """A raw label (class index, index as text, or class name) → class index, or ExampleError.

    An empty label (None, NaN, blank text) is None: the example is unlabeled, not broken. It is
    still audited (maps, prediction) and left out of the figures that need a label."""
    n = len(class_names)
    if _is_missing(raw):
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        text = raw.strip()
        if text in class_names:
            return list(class_names).index(text)
        try:
            raw = int(text)
        except ValueError:
            raise ExampleError(
                "label",
                "unknown_label",
                f"Label {text!r} is neither a class index nor one of the class names "
                f"{list(class_names)}; check --class-names.",
            ) from None
    if isinstance(raw, (float, np.floating)):
        if not float(raw).is_integer():
            raise ExampleError("label", "unknown_label", f"Label {raw!r} is not a class index.")
        raw = int(raw)
    index = int(raw)
    if not 0 <= index < n:
        raise ExampleError(
            "label",
            "label_out_of_range",
            f"Label {index} is outside the model's classes 0..{n - 1}.",
        )
    return index


def decode_example(
    ref: ExampleRef,
    spec: ImageSpec,
    class_names: Sequence[str],
    image_bytes: bytes,
    mask_bytes: Optional[bytes],
    labeled: bool,
) -> DecodedExample:
    """Decode one example whose bytes have been read; raises ExampleError on bad input."""
    label = parse_label(ref.raw_label, class_names) if labeled else None
    img = _open_image(image_bytes, "image", spec.max_image_pixels)
    image = preprocess(_to_float_array(img, spec), spec.preprocess).astype(np.float32)
    mask = decode_mask(mask_bytes, spec, img.size) if mask_bytes is not None else None
    return DecodedExample(
        example_id=ref.example_id,
        source=ref.source,
        image=image,
        label=label,
        mask=mask,
        slices=ref.slices,
    )


def parse_image_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``--image-size HxW`` → (H, W)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise OptionError(f"--image-size {text!r} must look like 224x224.") from None
    return h, w
