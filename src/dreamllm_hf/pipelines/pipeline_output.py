"""What [`DreamLLMPipeline`] returns: ordered documents of text and images, and their HTML / Markdown renderings."""

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from typing import Any

import PIL.Image
from diffusers.utils import BaseOutput

from ..modeling.conversation import segment_to_pil


class StopReason:
    """Why a document ended (the values of `DreamLLMPipelineOutput.stop_reasons`)."""

    EOS = "eos"  # the model emitted `</s>`
    MAX_NEW_TOKENS = "max_new_tokens"  # the text-token budget was spent
    MAX_IMAGES = "max_images"  # the model asked for one picture more than `max_images`
    CONTEXT_LIMIT = "context_limit"  # the next token or picture would not fit in `max_position_embeddings`
    CANCELLED = "cancelled"  # the document was cancelled while it was written (`DocumentWriter.cancel`)
    IMAGE = "image"  # a picture drawn by text-to-image, shown as a document (the web page, `generate --mode image`)


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# Small pictures (the demo model's are 32x32) are shown scaled up by a whole factor, pixels kept sharp, so that people
# see them; large ones keep their size. The web page (`dreamllm-hf serve`) shows them the same way.
MIN_PICTURE_DISPLAY_WIDTH = 256
PICTURE_CSS = "max-width:100%;height:auto;display:block;margin:1em 0"


def picture_display_width(width: int) -> int:
    """The width a picture of `width` pixels is shown at: a whole multiple of it, at least
    `MIN_PICTURE_DISPLAY_WIDTH`."""
    return width * max(1, math.ceil(MIN_PICTURE_DISPLAY_WIDTH / width))


def picture_html(image: PIL.Image.Image, alt: str) -> str:
    """An `<img>` with the picture embedded as a base64 PNG, at its display width."""
    data = base64.b64encode(_png_bytes(image)).decode("ascii")
    width = picture_display_width(image.width)
    # Sharp pixels only when scaled up (nearest-neighbour shrinking of a large picture would alias).
    style = ' style="image-rendering:pixelated"' if width > image.width else ""
    return f'<img alt="{html.escape(alt)}" width="{width}"{style} src="data:image/png;base64,{data}">'


@dataclass
class DocumentEvent:
    """
    One step of [`DreamLLMPipeline.stream`], in the order the documents are written.

    Args:
        type (`str`): `"text"` (new text of a document), `"picture_start"` (a document starts a picture),
            `"picture"` (the picture is drawn), `"document_end"` (a document is finished) or `"end"` (the last event).
        document (`int`, *optional*): the document it belongs to (prompt order, times `num_images_per_prompt`);
            `None` for `"end"`.
        text (`str`, *optional*): `"text"`: the text added. A document's `"text"` events, joined, are its `text`.
        image (*optional*): `"picture"`: the picture, in the call's `output_type`.
        index (`int`, *optional*): `"picture_start"` / `"picture"`: the picture's index in its document.
        stop_reason (`str`, *optional*): `"document_end"`: why the document ended (a [`StopReason`] value).
        output ([`DreamLLMPipelineOutput`], *optional*): `"end"`: what `__call__` returns; `"document_end"`: the
            finished document alone (as document 0).
        usage (`dict`, *optional*): `"document_end"`: `{"prompt_tokens", "completion_tokens", "pictures"}`: the
            prompt's positions (picture blocks included), the tokens sampled and the pictures drawn.
    """

    type: str
    document: int | None = None
    text: str | None = None
    image: Any = None
    index: int | None = None
    stop_reason: str | None = None
    output: "DreamLLMPipelineOutput | None" = None
    usage: dict | None = None


@dataclass
class DreamLLMPipelineOutput(BaseOutput):
    """
    Output of [`DreamLLMPipeline`]: one document per prompt (times `num_images_per_prompt`), in prompt order.

    Args:
        images: one list per document holding its images in order (PIL, `[H, W, 3]` arrays or `[3, H, W]` tensors,
            after `output_type`); empty for a text answer.
        text (`list[str]`, *optional*): per document, its text segments joined by newlines (the images left out);
            `None` for pictures drawn by text-to-image and shown as documents.
        documents (`list[list[str | image]]`): per document, its segments in reading order: `str` for text, anything
            else is an image of the `output_type` format. Empty text segments are left out.
        stop_reasons (`list[str]`): per document, why it ended; one of the [`StopReason`] values.
    """

    images: Any
    text: list[str] | None
    documents: list[list[Any]]
    stop_reasons: list[str]

    def to_html(self, index: int = 0, title: str = "DreamLLM") -> str:
        """Document `index` as a self-contained HTML page; images are embedded as base64 PNG."""
        parts = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{max-width:48em;margin:2em auto;font-family:sans-serif;line-height:1.5}"
            f"p{{white-space:pre-wrap}}img{{{PICTURE_CSS}}}</style>",
            "</head><body>",
        ]
        for number, segment in enumerate(self.documents[index]):
            if isinstance(segment, str):
                parts.append(f"<p>{html.escape(segment)}</p>")
            else:
                parts.append(picture_html(segment_to_pil(segment), alt=f"image {number}"))
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def save_html(self, path: str | os.PathLike, index: int = 0, title: str = "DreamLLM") -> str:
        """Write `to_html(index)` to `path`; returns the path."""
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_html(index, title=title))
        return str(path)

    def save_markdown(self, path: str | os.PathLike, index: int = 0) -> str:
        """
        Write document `index` as Markdown to `path`, each image as `<stem>_image_<k>.png` beside it (linked by a
        relative path). Returns the Markdown text.
        """
        folder, name = os.path.split(os.fspath(path))
        stem = os.path.splitext(name)[0]
        lines, image_count = [], 0
        for segment in self.documents[index]:
            if isinstance(segment, str):
                lines.append(segment)
            else:
                file_name = f"{stem}_image_{image_count}.png"
                segment_to_pil(segment).save(os.path.join(folder, file_name))
                lines.append(f"![image {image_count}]({file_name})")
                image_count += 1
        text = "\n\n".join(lines) + "\n"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return text


__all__ = [
    "MIN_PICTURE_DISPLAY_WIDTH",
    "PICTURE_CSS",
    "DocumentEvent",
    "DreamLLMPipelineOutput",
    "StopReason",
    "picture_display_width",
    "picture_html",
    "segment_to_pil",
]
