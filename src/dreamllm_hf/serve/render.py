"""The web page's HTML: a conversation of turns, each a document of text and pictures, growing while it is written.

Pictures are embedded as PNG data URIs and shown at the width `save_html` gives them (`picture_display_width`: a small
picture, such as the demo model's 32x32, scaled up by a whole factor to at least 256 px), pixels kept sharp when scaled
up, so that people see a picture rather than a blurry thumbnail.
"""

import base64
import html
import io
import threading
from collections import OrderedDict
from typing import Any

import PIL.Image

from ..pipelines.pipeline_output import MIN_PICTURE_DISPLAY_WIDTH, picture_display_width, segment_to_pil


PICTURE_CLASS = "dreamllm-picture"
_PICTURE_CSS = (
    f"img.{PICTURE_CLASS}{{display:block;margin:.5em 0;max-width:100%;height:auto}}"
    # Only scaled-up pictures: nearest-neighbour shrinking of a large upload would alias.
    f"img.{PICTURE_CLASS}.scaled{{image-rendering:pixelated}}"
)
DOCUMENT_CSS = (
    ".dreamllm-document{display:flex;flex-direction:column;gap:.75em;min-height:8em}"
    ".dreamllm-turn{padding:.6em .9em;border-radius:8px;border:1px solid #d0d4dc}"
    ".dreamllm-turn.user{background:#eef2fb}"
    ".dreamllm-turn .who{font-weight:600;font-size:.85em;margin-bottom:.2em}"
    ".dreamllm-turn p{white-space:pre-wrap;margin:.3em 0}"
    ".dreamllm-turn .note{font-style:italic;color:#5a6170}"
    f".dreamllm-placeholder{{width:{MIN_PICTURE_DISPLAY_WIDTH}px;height:{MIN_PICTURE_DISPLAY_WIDTH}px;display:flex;"
    "flex-direction:column;align-items:center;justify-content:center;gap:.5em;border:2px dashed #8a93a5;"
    "border-radius:6px;margin:.5em 0}"
    ".dreamllm-empty{color:#5a6170}"
    ".dreamllm-status{min-height:1.5em}.dreamllm-status.error{color:#b00020;font-weight:600}"
) + _PICTURE_CSS

# Data URIs of pictures already encoded: the page is re-rendered many times a second while a document grows, and its
# pictures do not change. Entries hold the image itself, so that its id() cannot be reused while it is cached.
_DATA_URIS: "OrderedDict[int, tuple[PIL.Image.Image, str]]" = OrderedDict()
_DATA_URI_CACHE_SIZE = 128
_DATA_URIS_LOCK = threading.Lock()  # pages of several sessions render at once
_DISPLAY_MAX_SIDE = 768  # larger uploads are shown (not given to the model) at this size


def _data_uri(image: PIL.Image.Image) -> str:
    with _DATA_URIS_LOCK:
        cached = _DATA_URIS.get(id(image))
        if cached is not None and cached[0] is image:
            _DATA_URIS.move_to_end(id(image))
            return cached[1]
    shown = image
    if max(image.size) > _DISPLAY_MAX_SIDE:
        shown = image.copy()
        shown.thumbnail((_DISPLAY_MAX_SIDE, _DISPLAY_MAX_SIDE))
    if shown.mode not in ("RGB", "RGBA", "L"):
        shown = shown.convert("RGB")
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    with _DATA_URIS_LOCK:
        _DATA_URIS[id(image)] = (image, uri)
        if len(_DATA_URIS) > _DATA_URI_CACHE_SIZE:
            _DATA_URIS.popitem(last=False)
    return uri


def picture_html(image: Any, alt: str) -> str:
    """An `<img>` of a picture segment (PIL, array or tensor), embedded, at its display width."""
    image = segment_to_pil(image)
    width = picture_display_width(image.width)
    height = round(image.height * width / image.width)
    scaled = " scaled" if width > image.width else ""
    return (
        f'<img class="{PICTURE_CLASS}{scaled}" alt="{html.escape(alt)}" src="{_data_uri(image)}" '
        f'width="{width}" height="{height}">'
    )


def placeholder_html(index: int, step: int, total: int) -> str:
    """Where picture `index` (0-based) will appear, with its denoising progress."""
    label = f"Drawing picture {index + 1}: step {step} of {total}" if total else f"Drawing picture {index + 1}"
    bar = f'<progress max="{total}" value="{step}"></progress>' if total else "<progress></progress>"
    return f'<div class="dreamllm-placeholder" role="img" aria-label="{label}"><span>{label}</span>{bar}</div>'


def _segments_html(segments: list, who: str) -> list[str]:
    parts, pictures = [], 0
    for segment in segments:
        if isinstance(segment, str):
            if segment.strip():
                parts.append(f"<p>{html.escape(segment.strip())}</p>")
        else:
            pictures += 1
            alt = "picture you attached" if who == "user" else f"picture {pictures} drawn by DreamLLM"
            parts.append(picture_html(segment, alt))
    return parts


def content_segments(content: Any) -> list:
    """A turn's content (a string, or a list of strings, pictures and `{"type": ...}` dicts) as text and pictures."""
    if isinstance(content, str):
        return [content]
    segments = []
    for item in content:
        if isinstance(item, dict):
            segments.append(item["text"] if item.get("type") == "text" else item["image"])
        else:
            segments.append(item)
    return segments


def turn_html(role: str, content: Any, drawing: tuple[int, int, int] | None = None, note: str | None = None) -> str:
    """One turn: `drawing` = (picture index, steps done, steps) adds the placeholder of the picture being drawn."""
    who = "You" if role == "user" else "DreamLLM"
    parts = [f'<div class="dreamllm-turn {html.escape(role)}"><div class="who">{who}</div>']
    parts += _segments_html(content_segments(content), role)
    if drawing is not None:
        parts.append(placeholder_html(*drawing))
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append("</div>")
    return "".join(parts)


def conversation_html(conversation: list[dict], live: str = "") -> str:
    """The conversation area (an ARIA log named "Document"); `live` is the HTML of the turn being written."""
    turns = [turn_html(message["role"], message["content"]) for message in conversation] + ([live] if live else [])
    if not turns:
        turns = ['<p class="dreamllm-empty">Type a message below and press Generate.</p>']
    return (
        '<div class="dreamllm-document" role="log" aria-label="Document" aria-live="polite">'
        + "".join(turns)
        + "</div>"
    )


def status_html(message: str = "", error: bool = False) -> str:
    """The status line: errors are announced at once (role="alert"), progress politely (role="status")."""
    role, kind = ("alert", " error") if error else ("status", "")
    return f'<div class="dreamllm-status{kind}" role="{role}" aria-label="Status">{html.escape(message)}</div>'


__all__ = [
    "DOCUMENT_CSS",
    "PICTURE_CLASS",
    "content_segments",
    "conversation_html",
    "picture_html",
    "placeholder_html",
    "status_html",
    "turn_html",
]
