"""One inline image, made to fit the model it goes to.

An image whose long edge is within the target travels exactly as it came (the earlier proxy
re-encoded every image and lost PNG detail and alpha for nothing). A larger one is decoded (a
JPEG in Pillow's draft mode, so a 24 MP photo is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
itself), resized with Lanczos, turned upright from its EXIF orientation (the small image: no
second full-size copy) and re-encoded: JPEG, or PNG when it has transparency.

Two steps, so that memory is counted before it is spent: ``open_inline``/``open_fetched``
read the header only and say what decoding will hold (``Plan.cost``, bytes of pixels); the
vision pool takes that much of its decode budget (``prepare.py``), then ``Opened.finish``
decodes. Synchronous and CPU-bound: both run in the vision pool's threads, never on the
event loop.
"""

from __future__ import annotations

import binascii
import functools
import io
import math
import re
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pybase64
from PIL import ExifTags, Image, UnidentifiedImageError

# Refuse at Pillow's own decompression-bomb threshold (89 MP, 4 bytes a pixel decoded), not
# past it: between it and twice it Pillow only *warns* and decodes anyway, so a 100 KB PNG
# declaring 12000x12000 pixels cost each vision thread half a gigabyte. Pillow's documented way
# to refuse there is to make its warning an error; the check below says so plainly.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
warnings.simplefilter("error", Image.DecompressionBombWarning)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


_OBJECT_REPR = re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>|\b0x[0-9a-fA-F]{6,}\b")


class ImageError(ValueError):
    """The image cannot be read; the message says why (the caller adds where it was). Object
    reprs Pillow puts in its messages (``<_io.BytesIO object at 0x7f...>``) are cut: a heap
    address is nobody's business."""

    def __init__(self, message: str) -> None:
        super().__init__(_OBJECT_REPR.sub("the data", message))


@dataclass(frozen=True)
class Fit:
    """What the model accepts: the long edge beyond which images are resized (0: none) and, for
    engines that take only some formats inline (Ollama: JPEG, PNG, WebP), those formats."""

    target_long_edge: int
    jpeg_quality: int
    formats: frozenset[str] | None = None


@dataclass(frozen=True)
class Prepared:
    url: str | None  # the new data URL; None: forward the image exactly as it came
    bytes_in: int
    bytes_out: int
    resized: bool = False


@dataclass(frozen=True)
class DataUrl:
    """A ``data:`` URL held as bytes. Its base64 is decoded with SIMD (``pybase64``: 8 MB in
    about 0.3 ms where the standard library took 20 ms), in one call: no call holds the GIL
    (and the event loop) for long even on a 20 MB photograph."""

    url: bytes
    comma: int  # where the header ends

    @classmethod
    def parse(cls, url: str | bytes) -> DataUrl:
        if isinstance(url, str):
            try:
                url = url.encode("ascii")
            except UnicodeEncodeError:
                raise ImageError("the data URL has characters that are not ASCII") from None
        comma = url.find(b",", 0, 256)
        if comma < 0 or not url.startswith(b"data:"):
            raise ImageError("the data URL has no ',' between its header and its data")
        return cls(url, comma)

    @property
    def header(self) -> str:
        return self.url[: self.comma].decode("ascii")

    @property
    def media_type(self) -> str:
        return self.header[5:].split(";", 1)[0].strip().lower()

    @property
    def is_base64(self) -> bool:
        return self.header.lower().endswith(";base64")

    def decoded_size(self) -> int:
        """The image's size in bytes, without decoding it (base64: 3 bytes per 4 characters)."""
        if not self.is_base64:
            return len(urllib.parse.unquote_to_bytes(self.url[self.comma + 1 :]))
        return (len(self.url) - self.comma - 1) * 3 // 4 - self.url[-2:].count(b"=")

    def data(self) -> bytes:
        if not self.is_base64:
            return urllib.parse.unquote_to_bytes(self.url[self.comma + 1 :])
        try:
            return _b64decode(self.url, self.comma + 1)
        except (binascii.Error, ValueError):
            pass
        try:  # some clients wrap base64 in lines; anything else is corrupt
            return _b64decode(b"".join(self.url[self.comma + 1 :].split()), 0)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"its base64 data is corrupt ({exc})") from None

    def payload_text(self) -> str:
        return self.url[self.comma + 1 :].decode("ascii")


def _b64decode(text: bytes, start: int) -> bytes:
    return pybase64.b64decode(memoryview(text)[start:], validate=True)


def to_data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{pybase64.b64encode_as_string(data)}"


def open_inline(url: str | bytes, fit: Fit) -> Opened:
    """The image of a ``data:`` URL, its header read (base64 decoded, no pixel yet): what
    fitting it will cost and, with ``Opened.finish``, the fitted image."""
    parsed = DataUrl.parse(url)
    raw = parsed.data()
    return Opened(open_image(raw, fit), functools.partial(_inline_prepared, parsed))


def _inline_prepared(parsed: DataUrl, plan: Plan) -> Prepared:
    raw = plan.raw
    rewritten, media_type, resized = plan.decode()
    if rewritten is not None:
        return Prepared(to_data_url(media_type, rewritten), len(raw), len(rewritten), resized)
    if plan.fit.formats is not None and parsed.media_type != media_type:
        # The engine reads the media type (Ollama): the right label, the same bytes.
        header = f"data:{media_type};base64" if parsed.is_base64 else f"data:{media_type}"
        return Prepared(f"{header},{parsed.payload_text()}", len(raw), len(raw))
    return Prepared(None, len(raw), len(raw))


def open_fetched(raw: bytes, fit: Fit) -> Opened:
    """An image the proxy fetched, its header read; ``finish`` inlines it as a data URL."""
    return Opened(open_image(raw, fit), _fetched_prepared)


def _fetched_prepared(plan: Plan) -> Prepared:
    rewritten, media_type, resized = plan.decode()
    data = plan.raw if rewritten is None else rewritten
    return Prepared(to_data_url(media_type, data), len(plan.raw), len(data), resized)


def prepare_inline(url: str | bytes, fit: Fit) -> Prepared:
    """The image of a ``data:`` URL, fitted; raises ``ImageError`` if it cannot be read."""
    return open_inline(url, fit).finish()


def prepare_fetched(raw: bytes, fit: Fit) -> Prepared:
    """An image the proxy fetched, fitted and inlined as a ``data:`` URL."""
    return open_fetched(raw, fit).finish()


def fit_image(raw: bytes, fit: Fit) -> tuple[bytes | None, str, bool]:
    """(new bytes or None if ``raw`` fits as it is, their media type, whether resized)."""
    return open_image(raw, fit).decode()


def bytes_per_pixel(mode: str) -> int:
    """What Pillow holds per pixel of ``mode``: one byte for the 8-bit single-band modes, two
    for 16-bit ones, four for everything else (RGB is stored as 4 bytes too)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


# Pillow's resize reduces by whole factors first (a box filter) while the image is at least
# this many times its target, then resamples with Lanczos: the same quality, a fraction of
# the work. Images with alpha are reduced in strips of about STRIP_BYTES, premultiplied one
# strip at a time: Pillow premultiplies the whole image first, a second full-size copy.
REDUCING_GAP = 3.0
STRIP_BYTES = 8 * 1024 * 1024
# Beside the pixels: the decoder's and encoder's buffers and the encoded result.
CODEC_BYTES = 16 * 1024 * 1024


@dataclass
class Plan:
    """An image whose header was read: what it is, what will be done to it, and the bytes of
    pixels that doing it will hold at most (``cost``: 0 when it travels as it came)."""

    raw: bytes
    fit: Fit
    media_type: str = ""  # of the image as it came, when it is not rewritten
    image: Image.Image | None = None  # to decode (draft already applied to a JPEG)
    resize: bool = False
    cost: int = 0

    def decode(self) -> tuple[bytes | None, str, bool]:
        image, self.image = self.image, None  # held here no longer: freed once shrunk
        if image is None:
            return None, self.media_type, False
        fmt = image.format or "image"
        try:
            data, media_type = _rewrite(
                image, self.fit if self.resize else None, self.fit.jpeg_quality
            )
        except (OSError, ValueError, SyntaxError, *_BOMB) as exc:
            raise ImageError(f"its {fmt} data cannot be decoded ({exc})") from None
        return data, media_type, self.resize


@dataclass
class Opened:
    """An image opened (its header read) and not yet decoded."""

    plan: Plan
    make: Callable[[Plan], Prepared]

    @property
    def cost(self) -> int:
        return self.plan.cost

    def finish(self) -> Prepared:
        return self.make(self.plan)


def open_image(raw: bytes, fit: Fit) -> Plan:
    """Read the header of ``raw`` (no pixel decoded): whether it must be rewritten, and at
    what cost. A JPEG to shrink is put in draft mode here, so its cost is that of the reduced
    decode libjpeg will do; a PNG has no such mode and counts its full decode."""
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except _BOMB:
        raise ImageError(f"it declares more than {MAX_PIXELS} pixels in all") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"it is not an image Pillow can read ({exc})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"it has {width}x{height} pixels, more than {MAX_PIXELS} in all")
    fmt = image.format or ""
    too_big = 0 < fit.target_long_edge < max(width, height)
    accepted = fit.formats is None or fmt in fit.formats
    if not too_big and accepted and fmt in _MEDIA_TYPES:
        return Plan(raw, fit, _MEDIA_TYPES[fmt])
    if not too_big and fit.formats is None:  # a format we have no label for, left alone
        return Plan(raw, fit, Image.MIME.get(fmt, "application/octet-stream"))
    if too_big and fmt == "JPEG":
        scale = fit.target_long_edge / max(width, height)
        # libjpeg decodes at the smallest 1/2^n scale still at least this big.
        try:
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        except (OSError, ValueError) as exc:
            raise ImageError(f"its JPEG data cannot be decoded ({exc})") from None
    return Plan(raw, fit, image=image, resize=too_big, cost=decode_cost(image, fit, too_big))


def decode_cost(image: Image.Image, fit: Fit, resize: bool) -> int:
    """The bytes of pixels fitting ``image`` holds at its peak: the decoded image (at its
    draft size) and, beside it, the copy reduced by a whole factor (with the three copies of
    one strip: cropped, premultiplied, reduced; or, for alpha without a reduction, the
    premultiplied full copy), and a few copies of the small result (resampled, converted,
    turned upright). Without a resize (a format change only): the decoded image and two
    converted or turned copies."""
    width, height = image.size
    full = width * height * bytes_per_pixel(image.mode)
    if not resize:
        return full + 2 * width * height * 4 + CODEC_BYTES
    scale = fit.target_long_edge / max(width, height)
    small = math.ceil(width * scale) * math.ceil(height * scale) * 4
    factor = int(1 / scale / REDUCING_GAP)
    alpha = image.mode in _PREMULTIPLIED
    if factor > 1:
        beside = math.ceil(width / factor) * math.ceil(height / factor) * 4
        beside += 3 * STRIP_BYTES if alpha else 0  # a strip, premultiplied, reduced
    else:
        beside = width * height * 4 if alpha else 0
    return full + beside + 3 * small + CODEC_BYTES


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PREMULTIPLIED = {"LA": "La", "RGBA": "RGBa"}


def _rewrite(image: Image.Image, fit: Fit | None, quality: int) -> tuple[bytes, str]:
    """Decode, resize to ``fit`` (None: same size, a format change only), turn upright from
    the EXIF orientation (the small image, not the full one: no second full-size copy) and
    encode."""
    image.load()
    turn = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    if fit is not None:
        scale = fit.target_long_edge / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = _shrink(image, size)
    if turn is not None:
        image = image.transpose(turn)
    out = io.BytesIO()
    if _has_alpha(image):
        image.save(out, "PNG", compress_level=3)
        return out.getvalue(), "image/png"
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), "image/jpeg"


def _shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` resized to ``size`` with Lanczos, as ``resize(..., reducing_gap=3)`` does it,
    but for images with alpha without premultiplying a full-size copy first: reduced by the
    whole factor strip by strip (each strip premultiplied on its own), then resampled."""
    premultiplied = _PREMULTIPLIED.get(image.mode)
    if premultiplied is None:
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    mode, (width, height) = image.mode, image.size
    factor_x = int(width / size[0] / REDUCING_GAP) or 1
    factor_y = int(height / size[1] / REDUCING_GAP) or 1
    if factor_x == factor_y == 1:
        reduced = image.convert(premultiplied)
    else:
        rows = max(factor_y, STRIP_BYTES // (width * 4) // factor_y * factor_y)
        reduced = Image.new(
            premultiplied, (math.ceil(width / factor_x), math.ceil(height / factor_y))
        )
        for top in range(0, height, rows):
            strip = image.crop((0, top, width, min(height, top + rows))).convert(premultiplied)
            reduced.paste(strip.reduce((factor_x, factor_y)), (0, top // factor_y))
    return reduced.resize(size, Image.Resampling.LANCZOS).convert(mode)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
