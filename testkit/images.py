"""Images made on the spot for tests and the benchmark: camera-like JPEGs (with an EXIF
orientation when asked), small PNGs, data URLs."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

from PIL import Image, ImageDraw

# EXIF tag 0x0112: 6 means "the camera was turned: rotate 90 degrees clockwise to view".
ORIENTATION = 0x0112


def photo(width: int, height: int, *, seed: int = 1, grain: int = 24) -> Image.Image:
    """A photograph-like RGB image: a red top-left quadrant (to see where it ends up after an
    orientation is applied), a blue rest, and grain so that JPEG cannot shrink it to nothing."""
    image = Image.new("RGB", (width, height), (30, 60, 200))
    ImageDraw.Draw(image).rectangle((0, 0, width // 2 - 1, height // 2 - 1), fill=(220, 30, 30))
    if grain:
        # Grain tiled from one small random patch: cheap to make, costly to compress.
        rng = random.Random(seed)
        side = 256
        noise = Image.frombytes(
            "L", (side, side), bytes(rng.randrange(256) for _ in range(side * side))
        )
        tiled = Image.new("L", (width, height))
        for x in range(0, width, side):
            for y in range(0, height, side):
                tiled.paste(noise, (x, y))
        image = Image.blend(image, Image.merge("RGB", (tiled, tiled, tiled)), grain / 255)
    return image


def jpeg_bytes(image: Image.Image, *, quality: int = 92, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(out, "JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    image = Image.new("RGBA", (width, height), (10, 200, 90, 128))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares ``width`` x ``height`` pixels (a
    decompression bomb; its pixel data is short, so decoding it also fails)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png_solid(
    width: int, height: int, rgba: tuple[int, int, int, int] = (200, 40, 40, 128)
) -> bytes:
    """An RGBA PNG of one colour, written row by row (never ``width`` x ``height`` pixels in
    memory): 9459x9459 is a 367 KB file that decodes to 358 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    row = b"\0" + bytes(rgba) * width  # filter type 0, then the pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def gif_bytes(width: int = 40, height: int = 30) -> bytes:
    out = io.BytesIO()
    Image.new("P", (width, height), 3).save(out, "GIF")
    return out.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def decode_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header.endswith(";base64"), header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def image_part(url: str, **extra: object) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}
