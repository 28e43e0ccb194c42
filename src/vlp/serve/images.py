"""Images in requests: base64 bytes or data URIs (or multipart uploads), decoded under the service's limits.
The service never reads a path on its own disk nor fetches a URL: a request carries its images."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image

from vlp.data.sources import as_rgb
from vlp.errors import BadQuery

DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


class PayloadTooLarge(BadQuery):
    """A request, or an image in it, over the service's limits (413)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # an encoded image
    max_pixels: int = 40_000_000  # a decoded image, width x height: read from the header, before decoding


def image_bytes(value: object, where: str) -> bytes:
    """The encoded bytes of a request's image: a data URI or bare base64."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        raise BadQuery(f"{where}: expected an image as base64 or a data URI, got {type(value).__name__}")
    if value.startswith(("http://", "https://", "ftp://", "file:")):
        raise BadQuery(f"{where}: image URLs are not fetched; send the image's bytes as base64 or a data URI")
    match = DATA_URI.match(value)
    if match and match.group("mime") and not match.group("mime").lower().startswith("image/"):
        raise BadQuery(f"{where}: a data URI of {match.group('mime')}, not an image")
    encoded = value[match.end():] if match else value
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadQuery(f"{where}: not valid base64 (send the image's bytes as base64 or a data URI; the service "
                       "does not read file paths)") from None


def decode_image(value: object, where: str, limits: ImageLimits) -> Image.Image:
    """An upright 8-bit RGB image from a request's value, refused with a 4xx error that names `where` when it
    is not an image, is cut short, or is over the limits (its pixel count is read before it is decoded)."""
    data = image_bytes(value, where)
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{where}: {len(data):,} bytes, over the limit of {limits.max_bytes:,}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(f"{where}: {width}x{height} pixels, over the limit of {limits.max_pixels:,}")
            image.load()
            return as_rgb(image)
    except PayloadTooLarge:
        raise
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{where}: too many pixels to decode (over the limit of {limits.max_pixels:,})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadQuery(f"{where}: not a readable image ({' '.join(str(err).split()) or type(err).__name__})") from None
