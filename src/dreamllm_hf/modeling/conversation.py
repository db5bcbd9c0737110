"""Conversations as people write them, turned into the prompt text and pictures the chat template and processor read.

A message's `content` is a string, or a list whose items are strings, pictures (PIL images, arrays, tensors) or
parts `{"type": "text", "text": ...}` / `{"type": "image"[, "image" | "url" | "path": ...]}`. An assistant turn may
be the previous output's document as it is (`output.documents[i]`: text segments and the pictures it drew).

A picture in a user turn is one the model reads (`<image>`: its CLIP block); a picture in an assistant turn is one the
model drew (`<dream>`: its dream block, then the CLIP block it read the picture back through). So a document handed
back as an assistant turn is rebuilt into the token stream the model wrote: its text segments joined as the tokenizer
splits them around a picture block, the pictures read back from the same 8-bit images, `</s>` at the end.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
import torch

from .. import constants as C


ROLES = ("system", "user", "assistant")
_PICTURE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)
_PICTURE_KEYS = ("image", "url", "path")


def render_conversation(
    conversation: list[dict], image: list | None = None, check_pictures: bool = True
) -> tuple[list[dict], list]:
    """
    The conversation with every message's content as one string (pictures as `<image>` / `<dream>`), and the pictures
    in reading order. A placeholder without a picture of its own (`{"type": "image"}`, or `<image>` / `<dream>` typed
    in the text) takes the next picture of `image`. `check_pictures=False` only renders the text: the pictures
    `image` lacks are left out instead of refused.
    """
    rendered = []  # (role, [str | ("picture", picture or None)])
    open_slots = 0
    for number, message in enumerate(conversation):
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"Message {number} of the conversation has role {role!r}; use 'system', 'user' or 'assistant'."
            )
        if "content" not in message:
            raise ValueError(f"Message {number} of the conversation ({role}) has no 'content'.")
        items = []
        for kind, value in _parts(message["content"], number):
            if kind == "text":
                slots = value.count(C.IMAGE_PLACEHOLDER) + value.count(C.DREAM_PLACEHOLDER)
                items.append(value)
                if slots:
                    open_slots += slots
                    items.append(("typed", slots))  # pictures of `<image>` / `<dream>` typed in the text
                continue
            if role == "system":
                raise ValueError(f"Message {number} is a system message with a picture; put pictures in user turns.")
            open_slots += value is None
            items.append(("picture", value))
        rendered.append((role, items))

    given = list(image or [])
    if check_pictures and open_slots != len(given):
        raise ValueError(
            f"The conversation has {open_slots} `<image>`/`<dream>` placeholders without a picture of their own "
            f"(`<image>` in the text or `{{'type': 'image'}}` parts) but `image` has {len(given)} pictures; give one "
            "picture per placeholder, or put the pictures in the messages as `{'type': 'image', 'image': picture}`."
        )
    supply = iter(given)
    messages, pictures = [], []
    for role, items in rendered:
        text = []
        for item in items:
            if isinstance(item, str):
                text.append(item)
            elif item[0] == "typed":
                for _ in range(item[1]):
                    picture = next(supply, None)
                    if picture is not None:
                        pictures.append(picture)
            else:
                picture = item[1] if item[1] is not None else next(supply, None)
                text.append(C.DREAM_PLACEHOLDER if role == "assistant" else C.IMAGE_PLACEHOLDER)
                if picture is None:
                    continue
                if role == "assistant" and not isinstance(picture, (PIL.Image.Image, str)):
                    # A drawn picture is read back as the 8-bit image it was saved as (what the model read).
                    picture = segment_to_pil(picture)
                pictures.append(picture)
        messages.append({"role": role, "content": "".join(text)})
    return messages, pictures


def segment_to_pil(segment: Any) -> PIL.Image.Image:
    """One image segment (PIL, `[H, W, 3]` array in [0, 1] or uint8, `[3, H, W]` tensor in [0, 1]) as a PIL image."""
    if isinstance(segment, PIL.Image.Image):
        return segment
    if isinstance(segment, torch.Tensor):
        if segment.ndim != 3 or segment.shape[0] not in (1, 3):
            raise ValueError(
                f"Cannot render a tensor of shape {tuple(segment.shape)}: expected a decoded `[3, H, W]` image "
                "(latents cannot be rendered; use output_type='pil', 'np' or 'pt')."
            )
        segment = segment.detach().float().cpu().permute(1, 2, 0).numpy()
    if isinstance(segment, np.ndarray):
        if segment.ndim != 3 or segment.shape[-1] not in (1, 3):
            raise ValueError(f"Cannot render an array of shape {segment.shape}: expected an `[H, W, 3]` image.")
        if segment.dtype != np.uint8:
            segment = (segment.clip(0, 1) * 255).round().astype(np.uint8)
        return PIL.Image.fromarray(segment.squeeze(-1) if segment.shape[-1] == 1 else segment)
    raise TypeError(f"Not an image segment: {type(segment).__name__}.")


def _parts(content: Any, number: int) -> Iterator[tuple[str, Any]]:
    """`("text", str)` and `("image", picture or None)` items of one message's content, in reading order."""
    if isinstance(content, str):
        yield "text", content
        return
    if not isinstance(content, (list, tuple)):
        raise ValueError(
            f"Message {number} has content of type {type(content).__name__}; give a string or a list of strings, "
            "pictures and `{'type': 'text' | 'image', ...}` parts."
        )
    for item in content:
        if isinstance(item, str):
            yield "text", item
        elif isinstance(item, _PICTURE_TYPES):
            yield "image", item
        elif isinstance(item, dict):
            kind = item.get("type")
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"Message {number} has a text part without a string 'text': {item!r}.")
                yield "text", item["text"]
            elif kind == "image":
                sources = [item[key] for key in _PICTURE_KEYS if item.get(key) is not None]
                if len(sources) > 1:
                    raise ValueError(f"Message {number} has an image part with more than one of {_PICTURE_KEYS}.")
                yield "image", sources[0] if sources else None
            else:
                raise ValueError(
                    f"Message {number} has a part of type {kind!r}; DreamLLM reads 'text' and 'image' parts."
                )
        else:
            raise ValueError(
                f"Message {number} has a content item of type {type(item).__name__}; give strings, pictures (PIL, "
                "array, tensor) or `{'type': 'text' | 'image', ...}` parts."
            )


__all__ = ["ROLES", "render_conversation", "segment_to_pil"]
