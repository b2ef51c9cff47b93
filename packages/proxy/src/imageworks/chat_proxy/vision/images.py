"""One inline image, made to fit the model it goes to.

An image whose long edge is within the target travels exactly as it came (the earlier proxy
re-encoded every image and lost PNG detail and alpha for nothing). A larger one is decoded (a
JPEG in Pillow's draft mode, so a 24 MP photo is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
itself), turned upright from its EXIF orientation, resized with Lanczos and re-encoded: JPEG,
or PNG when it has transparency. Synchronous and CPU-bound: it runs in the vision pool's
threads (``vision.py``), never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import urllib.parse
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

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


_B64_STEP = 256 * 1024  # base64 characters decoded per call (a multiple of 4)


@dataclass(frozen=True)
class DataUrl:
    """A ``data:`` URL held as bytes, its payload never copied whole: base64 is decoded in
    steps, so no single call holds the GIL (and the event loop) for long on a 16 MB photo."""

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
    out = bytearray()
    for at in range(start, len(text), _B64_STEP):
        out += base64.b64decode(text[at : at + _B64_STEP], validate=True)
    return bytes(out)


def to_data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def prepare_inline(url: str | bytes, fit: Fit) -> Prepared:
    """The image of a ``data:`` URL, fitted; raises ``ImageError`` if it cannot be read."""
    parsed = DataUrl.parse(url)
    raw = parsed.data()
    rewritten, media_type, resized = fit_image(raw, fit)
    if rewritten is not None:
        return Prepared(to_data_url(media_type, rewritten), len(raw), len(rewritten), resized)
    if fit.formats is not None and parsed.media_type != media_type:
        # The engine reads the media type (Ollama): the right label, the same bytes.
        header = f"data:{media_type};base64" if parsed.is_base64 else f"data:{media_type}"
        return Prepared(f"{header},{parsed.payload_text()}", len(raw), len(raw))
    return Prepared(None, len(raw), len(raw))


def prepare_fetched(raw: bytes, fit: Fit) -> Prepared:
    """An image the proxy fetched, fitted and inlined as a ``data:`` URL."""
    rewritten, media_type, resized = fit_image(raw, fit)
    data = raw if rewritten is None else rewritten
    return Prepared(to_data_url(media_type, data), len(raw), len(data), resized)


def fit_image(raw: bytes, fit: Fit) -> tuple[bytes | None, str, bool]:
    """(new bytes or None if ``raw`` fits as it is, their media type, whether resized)."""
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
        return None, _MEDIA_TYPES[fmt], False
    if not too_big and fit.formats is None:  # a format we have no label for, left alone
        return None, Image.MIME.get(fmt, "application/octet-stream"), False
    try:
        data, media_type = _rewrite(image, fit if too_big else None, fit.jpeg_quality)
    except (OSError, ValueError, SyntaxError, *_BOMB) as exc:
        raise ImageError(f"its {fmt or 'image'} data cannot be decoded ({exc})") from None
    return data, media_type, too_big


def _rewrite(image: Image.Image, fit: Fit | None, quality: int) -> tuple[bytes, str]:
    """Decode, turn upright, resize to ``fit`` (None: same size, a format change only), and
    encode."""
    if fit is not None and image.format == "JPEG":
        scale = fit.target_long_edge / max(image.size)
        # libjpeg decodes at the smallest 1/2^n scale still at least this big.
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    image = ImageOps.exif_transpose(image)
    if fit is not None:
        scale = fit.target_long_edge / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if _has_alpha(image):
        image.save(out, "PNG", compress_level=3)
        return out.getvalue(), "image/png"
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), "image/jpeg"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
