"""Pictures in and out of the API: base64 data URLs and uploaded files read into PIL images, and PNGs written back as
base64."""

import base64
import binascii
import io
import re
import warnings

import PIL.Image

from .errors import APIError


# `data:[<media type>][;<parameter>]*;base64,<data>`
_DATA_URL = re.compile(r"data:(?P<media>[^;,]*)(?P<parameters>(?:;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
_REMOTE_SCHEMES = ("http://", "https://", "ftp://", "file://")


def read_data_url(url, param: str) -> PIL.Image.Image:
    """The RGB picture in a base64 data URL (`data:image/png;base64,...`), or an [`APIError`] (400) naming `param` and
    what is wrong: a remote URL (this server fetches nothing), another kind of URL, broken base64, not a picture."""
    if not isinstance(url, str):
        raise APIError(400, f"`{param}` must be a string (a data URL), got {type(url).__name__}.", param=param)
    if url.lower().startswith(_REMOTE_SCHEMES):
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise APIError(
            400,
            f"`{param}` is a remote URL ({shown}); this server does not fetch pictures from the network. Send the "
            "picture inline as a base64 data URL: `data:image/png;base64,<the PNG file in base64>`.",
            param=param,
            code="remote_url_not_supported",
        )
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        start = url[:30] + ("..." if len(url) > 30 else "")
        raise APIError(
            400,
            f"`{param}` is not a base64 data URL (it starts {start!r}); give `data:image/png;base64,<data>` (PNG, JPEG, "
            "WebP... in base64).",
            param=param,
            code="invalid_image_url",
        )
    media = match["media"].strip().lower()
    if media and not media.startswith("image/"):
        raise APIError(
            400,
            f"`{param}` holds {media!r}, not a picture; give an `image/...` data URL.",
            param=param,
            code="invalid_image_url",
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match["data"]), validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, f"`{param}` does not hold valid base64 data ({error}).", param=param, code="invalid_image_url"
        ) from None
    return read_picture(data, param, " in base64")


# The files `POST /v1/images/edits` reads, as OpenAI's edits (PIL's names), and how the messages say them.
EDIT_FORMATS = ("PNG", "JPEG", "WEBP")
_FORMATS_SAID = "PNG, JPEG or WebP"


def read_picture(data: bytes, param: str, how: str = "", formats: tuple[str, ...] | None = None) -> PIL.Image.Image:
    """The RGB picture in the file `data`, or an [`APIError`] (400) naming `param`: not a picture, too large a one to
    decode, or (with `formats`) a file of another kind."""
    try:
        with warnings.catch_warnings():
            # A picture of a huge number of pixels (a decompression bomb) is refused, not decoded.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            picture = PIL.Image.open(io.BytesIO(data))
            picture.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise APIError(400, f"`{param}` is too large a picture: {error}", param=param, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises on data it cannot read
        raise APIError(
            400,
            f"`{param}` is not a picture that can be read ({error}); give a {_FORMATS_SAID} file{how}.",
            param=param,
            code="invalid_image",
        ) from None
    if formats is not None and picture.format not in formats:
        raise APIError(
            400,
            f"`{param}` is a {picture.format} picture; this route reads {_FORMATS_SAID} files.",
            param=param,
            code="invalid_image_format",
        )
    return picture.convert("RGB")


def png_base64(picture: PIL.Image.Image) -> str:
    """The picture as a PNG file, in base64."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(picture: PIL.Image.Image) -> str:
    """The picture as a `data:image/png;base64,...` URL."""
    return "data:image/png;base64," + png_base64(picture)


__all__ = ["EDIT_FORMATS", "png_base64", "png_data_url", "read_data_url", "read_picture"]
