"""Decoding images of any PIL mode: faithful RGB for storage and training, the official order for evaluation.

`open_image` decodes a file (bytes or path) with a size guard; `to_rgb` turns every mode PIL opens into the RGB image
it depicts: alpha composited over a background, EXIF orientation applied, 16/32-bit greyscale scaled to 8 bits.
`for_eval` prepares an image for an evaluation transform that, like the official CLIP-S / PAC-S tools and open_clip's
eval preprocess, resizes and crops first and converts to RGB last. See docs/data.md, "Image modes".
"""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
HIGH_BIT = ("I", "F")  # plus every "I;16*": greyscale that convert("L"/"RGB") clips at 255 instead of scaling
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image this module cannot turn into pixels; callers count it as a fault."""


class ImageTooLarge(ImageError):
    def __init__(self, pixels: int, limit: int):
        super().__init__(f"image too large ({pixels} pixels, limit {limit})")
        self.pixels, self.limit = pixels, limit


def check_size(im: Image.Image) -> None:
    """PIL's decompression-bomb limit, applied to every image here, not only to those Image.open warns about."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise ImageTooLarge(im.width * im.height, limit)


def open_image(src: bytes | str) -> Image.Image:
    """Image.open + a full decode (a truncated file fails here, not later). Past Image.MAX_IMAGE_PIXELS it raises
    ImageTooLarge before any pixel is decoded, whatever the process's warning filters: PIL raises past twice the
    limit, warns below (an error where the filters say so), and check_size raises for the rest.

    No warnings.catch_warnings here: every change of the filters resets Python's "shown once" memory, and with one
    per image every library warning came back at every step (torch's FutureWarnings, twice per XE step)."""
    if isinstance(src, str):
        with open(src, "rb") as f:
            src = f.read()  # no file handle stays open with the image
    try:
        im = Image.open(io.BytesIO(src))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(int(pixels[1]) if pixels else -1, Image.MAX_IMAGE_PIXELS) from None
    check_size(im)
    im.load()
    return im


def exif_orientation(im: Image.Image) -> int | None:
    """The EXIF (or XMP) orientation, 1 when there is none, None when the metadata cannot be read."""
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:
        return None


def _upright(im: Image.Image) -> Image.Image:
    """A decoded copy with its EXIF orientation applied (a copy even when upright: callers own the result)."""
    im.load()  # decode errors propagate; only unreadable metadata is forgiven below
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF: the orientation is unknown, the pixels are fine; keep them as stored
        return im.copy()


def _grey8(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale -> 8-bit L by the range the values were stored in.

    I;16*: the full 16-bit range (v >> 8, exact for 8-bit data stored as v * 257). I and F carry no range, so it is
    read from the data: max <= 255 is 8-bit data, <= 65535 16-bit (>> 8 as for I;16), larger values are scaled by
    the max. F with max <= 1.0 is the [0, 1] float convention (x 255). Negative and non-finite values become 0.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray((a >> 8).astype(np.uint8))
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    top = float(a.max()) if a.size else 0.0
    if im.mode == "F" and top <= 1.0:
        a = np.rint(a * 255)
    elif top <= 255:
        a = np.rint(a)
    elif top <= 65535:
        a = np.floor(a / 256)
    else:
        a = np.rint(a * (255 / top))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _has_alpha(im: Image.Image) -> bool:
    return (im.mode in ALPHA or "transparency" in im.info  # P with tRNS, L/RGB with a transparent colour
            or (im.mode == "P" and getattr(im.palette, "mode", "") == "RGBA"))


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The RGB image `im` depicts, for any PIL mode; a new image (im is left as it is).

    Alpha (RGBA, LA, PA, premultiplied RGBa/La, palette or colour-key transparency) is composited over `background`,
    never dropped to whatever colour lies under it. CMYK, YCbCr, HSV and LAB use PIL's conversions. Raises
    ImageTooLarge past Image.MAX_IMAGE_PIXELS and ImageError (naming the mode) for anything else it cannot convert.
    """
    check_size(im)
    mode = im.mode
    try:
        im = _upright(im)
        if mode.startswith("I;16") or mode in HIGH_BIT:
            im = _grey8(im)
        if mode == "La":
            im = im.convert("LA")  # PIL converts La only to LA
        if _has_alpha(im):
            rgba = im.convert("RGBA")  # un-premultiplies RGBa, looks palette alpha up
            base = Image.new("RGBA", im.size, (*background, 255))
            return Image.alpha_composite(base, rgba).convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert image mode {mode} to RGB: {type(e).__name__}: {e}") from e


def for_eval(im: Image.Image) -> Image.Image:
    """The image for a transform that resizes and crops first and converts to RGB last (the official CLIP-S / PAC-S
    order), so it stays in its own mode: RGBA, P, CMYK... reach the transform as they are, as with Image.open.

    Only three changes, each where the official order has no faithful answer: EXIF orientation is applied;
    16/32-bit greyscale becomes 8-bit L as in to_rgb (PIL resizes it, but convert("RGB") clips it at 255: an almost
    white image); La and PA become LA and RGBA (convert("RGB") rejects La; a bicubic resize would blend PA's palette
    indices). Every mode returned converts to RGB with PIL.
    """
    check_size(im)
    mode = im.mode
    try:
        im = _upright(im)
        if mode.startswith("I;16") or mode in HIGH_BIT:
            return _grey8(im)
        return im.convert({"La": "LA", "PA": "RGBA"}[mode]) if mode in ("La", "PA") else im
    except Exception as e:
        raise ImageError(f"cannot prepare image mode {mode}: {type(e).__name__}: {e}") from e
