"""What the API takes and gives: the request bodies (checked with the pipelines' own ranges, so that a bad number gets
the message the pipeline would give), the documents they become, and the OpenAI-shaped answers.

Field names follow OpenAI's chat and images APIs, and vLLM-Omni's extensions for pictures where it has one
(`modalities`, `num_inference_steps`, `guidance_scale`, `height`, `width`, `size`, `seed`, `negative_prompt`, and the
nested `extra_body` object of its curl examples); `max_images` is DreamLLM's own. See docs/api.md.
"""

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from ... import checks
from ...modeling.conversation import ROLES
from ...pipelines import DocumentRequest
from ...pipelines.pipeline_output import StopReason
from ..engine import seeded_generator
from .errors import APIError
from .pictures import png_data_url, read_data_url


# OpenAI's temperature range; 0 is greedy decoding (the pipeline's own `temperature` must be > 0).
API_TEMPERATURE = checks.NumberRange(integer=False, minimum=0, maximum=2)
MAX_CHOICES = 16  # `n`: documents (or pictures) one request may ask for
CHOICES = checks.NumberRange(integer=True, minimum=1, maximum=MAX_CHOICES)
# A bound on the work one request may ask for (the scheduler's training timesteps are 1000).
MAX_INFERENCE_STEPS = 1000
API_STEPS = checks.NumberRange(integer=True, minimum=1, maximum=MAX_INFERENCE_STEPS)
MODALITIES = ("text", "image")
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message

# OpenAI fields this server does not implement. The value each takes when it is "off" is accepted (some clients always
# send it); any other value is refused with a message rather than silently ignored.
_UNSUPPORTED_CHAT_FIELDS = {
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "audio": (None,),
    "prediction": (None,),
}
_UNSUPPORTED_IMAGE_FIELDS = {
    "quality": (None, "auto", "standard"),
    "style": (None,),
    "background": (None, "auto"),
    "moderation": (None, "auto"),
    "output_format": (None, "png"),
    "output_compression": (None, 100),
    "partial_images": (None, 0),
}
# `/v1/images/edits` also has OpenAI's edit options; a mask has a message of its own (`edit_request`).
_UNSUPPORTED_EDIT_FIELDS = {**_UNSUPPORTED_IMAGE_FIELDS, "input_fidelity": (None,), "stream": (None, False)}
# Accepted and not used: they change nothing in what is written.
_IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


def _within(number_range: checks.NumberRange, name: str):
    """A pydantic check of a field with the pipelines' range (its message names the field as the API calls it)."""
    return BeforeValidator(lambda value: number_range.check(name, value, optional=True))


# ---------------------------------------------------------------------------------------------------------------------
# Requests


def _content(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        return value
    raise ValueError(
        "must be a string or a list of parts (`{'type': 'text', 'text': ...}`, `{'type': 'image_url', 'image_url': "
        f"{{'url': 'data:image/png;base64,...'}}}}`), got {value!r:.60} ({type(value).__name__})."
    )


class ChatMessage(BaseModel):
    """One message: `content` a string or a list of `{"type": "text", "text"}` / `{"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}}` parts (checked when the conversation is built)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Annotated[Any, BeforeValidator(_content)] = None
    name: str | None = None
    tool_calls: list | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI adds options; only this one changes anything

    include_usage: bool = True


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`: OpenAI's fields, vLLM's `top_k` and `repetition_penalty`, and the pictures'."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: Annotated[int | None, _within(checks.MAX_NEW_TOKENS, "max_tokens")] = None
    max_completion_tokens: Annotated[int | None, _within(checks.MAX_NEW_TOKENS, "max_completion_tokens")] = None
    temperature: Annotated[float | None, _within(API_TEMPERATURE, "temperature")] = None
    top_p: Annotated[float | None, _within(checks.TOP_P, "top_p")] = None
    top_k: Annotated[int | None, _within(checks.TOP_K, "top_k")] = None
    repetition_penalty: Annotated[float | None, _within(checks.REPETITION_PENALTY, "repetition_penalty")] = None
    seed: Annotated[int | None, _within(checks.SEED, "seed")] = None
    n: Annotated[int, _within(CHOICES, "n")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Pictures: vLLM-Omni's names, and DreamLLM's `max_images`
    modalities: list[str] | None = None
    max_images: Annotated[int | None, _within(checks.MAX_IMAGES, "max_images")] = None
    num_inference_steps: Annotated[int | None, _within(API_STEPS, "num_inference_steps")] = None
    guidance_scale: Annotated[float | None, _within(checks.GUIDANCE_SCALE, "guidance_scale")] = None
    height: Annotated[int | None, _within(checks.PICTURE_SIDE, "height")] = None
    width: Annotated[int | None, _within(checks.PICTURE_SIDE, "width")] = None
    size: str | None = None
    negative_prompt: str | None = None
    user: str | None = None


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields and vLLM-Omni's extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    n: Annotated[int, _within(CHOICES, "n")] = 1
    size: str | None = None
    response_format: str | None = None
    seed: Annotated[int | None, _within(checks.SEED, "seed")] = None
    num_inference_steps: Annotated[int | None, _within(API_STEPS, "num_inference_steps")] = None
    guidance_scale: Annotated[float | None, _within(checks.GUIDANCE_SCALE, "guidance_scale")] = None
    negative_prompt: str | None = None
    user: str | None = None


class ImageEditRequest(ImageGenerationRequest):
    """`POST /v1/images/edits` but its pictures: the fields of `/v1/images/generations`, `prompt` being what to change
    ("Make it blue.")."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request that leaves a field out gets (the demo model's are `for_demo_model()`)."""

    max_tokens: int = 256
    max_images: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5

    @classmethod
    def for_demo_model(cls) -> "GenerationDefaults":
        from ...shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS

        return cls(max_images=4, num_inference_steps=DEMO_NUM_INFERENCE_STEPS, guidance_scale=DEMO_GUIDANCE_SCALE)


def parse_request(data: Any, model: type[BaseModel]) -> BaseModel:
    """`data` (the JSON body) as `model`, or an [`APIError`] (400) naming the field at fault. A nested `extra_body`
    object (how vLLM-Omni's curl examples pass the extension fields) is merged into the body first."""
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    data = dict(data)
    extra = data.pop("extra_body", None)
    if extra is not None:
        if not isinstance(extra, dict):
            raise APIError(400, "`extra_body` must be an object of extra fields.", param="extra_body")
        for name, value in extra.items():
            if name in data and data[name] != value:
                raise APIError(
                    400, f"`{name}` is given twice, with different values: in the body and in `extra_body`."
                )
            data[name] = value
    unsupported = _UNSUPPORTED_FIELDS[model]
    for name in list(data):
        if name in unsupported:
            if not _is_off(data[name], unsupported[name]):
                raise APIError(
                    400,
                    f"`{name}` is not supported by this server (DreamLLM); leave it out.",
                    param=name,
                    code="unsupported_parameter",
                )
            del data[name]
        elif name in _IGNORED_FIELDS and name not in model.model_fields:
            del data[name]
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error, model) from None


_UNSUPPORTED_FIELDS = {
    ChatCompletionRequest: _UNSUPPORTED_CHAT_FIELDS,
    ImageGenerationRequest: _UNSUPPORTED_IMAGE_FIELDS,
    ImageEditRequest: _UNSUPPORTED_EDIT_FIELDS,
}


# ---------------------------------------------------------------------------------------------------------------------
# Edits: multipart/form-data, as the openai client's `images.edit` sends them

MAX_EDIT_PICTURES = 16  # OpenAI's bound on the pictures of one edit
# One picture is `image`; the openai client sends a list as `image[]`, one part each, in order.
EDIT_PICTURE_FIELDS = ("image", "image[]")


def _form_value(name: str, text: str, model: type[BaseModel]):
    """A form field's text as the JSON value it stands for (form data is text: the openai client writes `n=2` as
    "2"): a number for a numeric field of `model`, a number or a boolean for an unsupported one (compared with its
    "off" values), else the text."""
    annotation = model.model_fields[name].annotation if name in model.model_fields else None
    numeric = {int, float} & {annotation, *get_args(annotation)}
    if name in _UNSUPPORTED_EDIT_FIELDS and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if numeric or name in _UNSUPPORTED_EDIT_FIELDS:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def edit_request(
    items: list[tuple[str, Any]], max_pictures: int = MAX_EDIT_PICTURES
) -> tuple[ImageEditRequest, list[UploadFile]]:
    """The fields of an edit's form (`(name, text or file)` in the order sent) as an [`ImageEditRequest`], and its
    picture files in order; an [`APIError`] (400) for a missing or textual `image`, a `mask`, more pictures than
    `max_pictures` (`edit_picture_limit`), a field given twice, or a field as `parse_request` refuses it."""
    pictures, fields = [], {}
    for name, value in items:
        if name == "mask":
            raise APIError(
                400,
                "`mask` is not supported by this route: an edit here draws a new picture that reads yours (DreamLLM's "
                "in-context edit), it does not repaint a region. To repaint under a mask, use "
                "`DreamLLMInpaintPipeline` (`mask_image`); leave `mask` out to edit the whole picture.",
                param="mask",
                code="unsupported_parameter",
            )
        if name in EDIT_PICTURE_FIELDS:
            if not isinstance(value, UploadFile):
                raise APIError(
                    400,
                    "`image` must be a file part of the form (a PNG, JPEG or WebP file: `curl -F image=@red.png`, or "
                    "`image=open(path, 'rb')` in the openai client), got text.",
                    param="image",
                    code="invalid_image",
                )
            pictures.append(value)
            continue
        if isinstance(value, UploadFile):
            raise APIError(400, f"`{name}` must be text, got a file.", param=name)
        if name in fields:
            raise APIError(400, f"`{name}` is given twice; give it once.", param=name)
        fields[name] = _form_value(name, value, ImageEditRequest)
    if not pictures:
        raise APIError(
            400,
            "`image` is required: send the picture to edit as a file part of the form (`curl -F image=@red.png`), "
            "and `image[]` once per picture for several.",
            param="image",
        )
    if len(pictures) > max_pictures:
        raise APIError(
            400,
            f"`image`: {len(pictures)} pictures were sent, but an edit on this server reads at most {max_pictures} "
            f"(OpenAI's {MAX_EDIT_PICTURES}, or fewer when the model's context holds fewer); send fewer pictures.",
            param="image",
        )
    return parse_request(fields, ImageEditRequest), pictures


def edit_picture_limit(text2image) -> int:
    """The most pictures an edit may send to `text2image`: `MAX_EDIT_PICTURES`, or fewer when the model's context
    cannot hold more of them before BOS and the dream block (the instruction's own tokens are checked by the
    pipeline)."""
    processor = text2image.processor
    room = text2image.max_context_length - 1 - len(processor.dream_block_ids)
    return max(0, min(MAX_EDIT_PICTURES, room // len(processor.image_block_ids)))


def _is_off(value, offs: tuple) -> bool:
    """Whether `value` is one of the values that turn a field off (`0.0` is `0`, but `False` is not `0`)."""
    return any(value == off and isinstance(value, bool) == isinstance(off, bool) for off in offs)


def validation_error(error: ValidationError, model: type[BaseModel]) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (`messages[0].content`)."""
    problem = error.errors()[0]
    param = _path(problem["loc"])
    cause = problem.get("ctx", {}).get("error")
    if problem["type"] == "value_error" and cause is not None:
        # The pipelines' own message (from `checks`), which names the field; or one to put after the field's path.
        message = str(cause) if str(cause).startswith("`") else f"`{param}` {cause}"
    elif problem["type"] == "missing":
        message = f"`{param}` is required."
    elif problem["type"] == "extra_forbidden":
        files = EDIT_PICTURE_FIELDS[:1] if model is ImageEditRequest else ()  # its pictures, read beside the model
        known = ", ".join(f"`{name}`" for name in (*files, *model.model_fields))
        message = f"Unknown field `{param}`. The fields this server reads are {known}."
        return APIError(400, message, param=param, code="unknown_parameter")
    else:
        given = problem.get("input")
        shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
        message = f"`{param}`: {problem['msg']}, got {shown} ({type(given).__name__})."
    return APIError(400, message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _path(location) -> str:
    path = ""
    for item in location:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not path:
            path = str(item)
        elif str(item) not in _TYPE_TAGS and "[" not in str(item):  # a union member's tag is not a field
            path += f".{item}"
    return path


def check_model(requested: str | None, served: str) -> None:
    """A 404 when the request names another model than the one served (leaving `model` out takes it)."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model {requested!r} does not exist on this server; it serves {served!r} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )


def picture_size(size: str | None, height: int | None, width: int | None) -> tuple[int | None, int | None]:
    """`(height, width)` from `size` (`"WIDTHxHEIGHT"`, or `"auto"`) and/or `height` / `width`."""
    if size is None or size == "auto":
        return height, width
    match = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", size)
    if match is None:
        raise APIError(
            400, f"`size` must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto', got {size!r}.", param="size"
        )
    size_width, size_height = int(match[1]), int(match[2])
    checks.PICTURE_SIDE.check("size", size_width)
    checks.PICTURE_SIDE.check("size", size_height)
    if (height is not None and height != size_height) or (width is not None and width != size_width):
        raise APIError(400, f"`size` {size!r} disagrees with `height`/`width`; give one of them.", param="size")
    return size_height, size_width


def document_seeds(seed: int | None, count: int) -> list[int]:
    """The seeds of a request's `count` documents or pictures: `seed`, `seed + 1`, ... (a random `seed` when none is
    given, so that each still has a generator of its own)."""
    if seed is None:
        seed = secrets.randbits(63)
    if seed + count - 1 > checks.SEED.maximum:
        raise APIError(
            400,
            f"`seed` + `n` - 1 must be at most 2**64 - 1 (the documents take seeds seed, seed + 1, ...), got "
            f"seed={seed}, n={count}.",
            param="seed",
        )
    return [seed + index for index in range(count)]


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the pipeline's conversation: pictures read from their data URLs (in user turns, pictures the
    model reads; in assistant turns, pictures it drew, rebuilt as it wrote them)."""
    turns = []
    for number, message in enumerate(messages):
        role = _ROLE_ALIASES.get(message.role, message.role)
        if role not in ROLES:
            raise APIError(
                400,
                f"`messages[{number}].role` is {message.role!r}; DreamLLM reads 'system' (or 'developer'), 'user' and "
                "'assistant' messages (no tool or function messages).",
                param=f"messages[{number}].role",
            )
        if message.tool_calls:
            raise APIError(400, "Tool calls are not supported by DreamLLM.", param=f"messages[{number}].tool_calls")
        if message.content is None:
            raise APIError(400, f"`messages[{number}].content` is missing.", param=f"messages[{number}].content")
        if isinstance(message.content, str):
            turns.append({"role": role, "content": message.content})
            continue
        parts = []
        for index, part in enumerate(message.content):
            param = f"messages[{number}].content[{index}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"`{param}.text` must be a string.", param=f"{param}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                parts.append({"type": "image", "image": read_data_url(url, f"{param}.image_url")})
            else:
                raise APIError(
                    400,
                    f"`{param}` has type {kind!r}; DreamLLM reads 'text' and 'image_url' parts (pictures as base64 "
                    "data URLs).",
                    param=f"{param}.type",
                )
        turns.append({"role": role, "content": parts})
    return turns


def chat_documents(request: ChatCompletionRequest, defaults: GenerationDefaults) -> list[DocumentRequest]:
    """The `n` documents a chat request asks for, seeds `seed`, `seed + 1`, ..."""
    if request.max_tokens is not None and request.max_completion_tokens not in (None, request.max_tokens):
        raise APIError(400, "Give `max_tokens` or `max_completion_tokens`, not both.", param="max_completion_tokens")
    modalities = request.modalities if request.modalities is not None else list(MODALITIES)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or "text" not in modalities:
        raise APIError(
            400,
            f"`modalities` must be ['text'] (a text answer) or ['text', 'image'] (a document with pictures), got "
            f"{modalities!r}. For a picture alone use POST /v1/images/generations.",
            param="modalities",
        )
    height, width = picture_size(request.size, request.height, request.width)
    greedy = request.temperature == 0  # OpenAI's way of asking for greedy decoding
    settings = dict(
        max_new_tokens=request.max_tokens or request.max_completion_tokens or defaults.max_tokens,
        max_images=request.max_images if request.max_images is not None else defaults.max_images,
        allow_images="image" in modalities,
        do_sample=not greedy,
        temperature=None if greedy else request.temperature,
        top_p=None if greedy else request.top_p,
        top_k=None if greedy else request.top_k,
        repetition_penalty=request.repetition_penalty,
        num_inference_steps=request.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else defaults.guidance_scale,
        negative_prompt=request.negative_prompt,
        height=height,
        width=width,
        output_type="pil",
    )
    turns = conversation(request.messages)
    return [
        DocumentRequest(prompt=turns, generator=seeded_generator(seed), **settings)
        for seed in document_seeds(request.seed, request.n)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Answers

# How a document's end reads in OpenAI's words ("length": a limit cut it); `stop_reason` keeps DreamLLM's own.
FINISH_REASONS = {
    StopReason.EOS: "stop",
    StopReason.MAX_NEW_TOKENS: "length",
    StopReason.CONTEXT_LIMIT: "length",
    StopReason.MAX_IMAGES: "length",
}


def finish_reason(stop_reason: str) -> str:
    return FINISH_REASONS.get(stop_reason, "stop")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def image_part(picture) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(picture)}}


def message_content(segments: list) -> str | list[dict]:
    """A document as a message's content: its text when it holds no picture (a plain chat answer), else its segments in
    reading order as text and image parts."""
    if all(isinstance(segment, str) for segment in segments):
        return "\n".join(segments)
    return [
        {"type": "text", "text": segment} if isinstance(segment, str) else image_part(segment) for segment in segments
    ]


def usage(documents_usage: list[dict]) -> dict:
    """The usage of a request's documents: the prompt counted once (as OpenAI does for `n` > 1), what they wrote
    summed; `pictures` is DreamLLM's own."""
    prompt = documents_usage[0]["prompt_tokens"] if documents_usage else 0
    completion = sum(u["completion_tokens"] for u in documents_usage)
    pictures = sum(u["pictures"] for u in documents_usage)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "pictures": pictures,
    }


def chunk(completion: str, created: int, model: str, choices: list, modality: str = "text", **fields) -> dict:
    """One `chat.completion.chunk` (`modality` as vLLM-Omni marks its chunks: "text" or "image")."""
    return {
        "id": completion,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "modality": modality,
        **fields,
    }


__all__ = [
    "API_STEPS",
    "API_TEMPERATURE",
    "CHOICES",
    "EDIT_PICTURE_FIELDS",
    "FINISH_REASONS",
    "MAX_CHOICES",
    "MAX_EDIT_PICTURES",
    "MAX_INFERENCE_STEPS",
    "MODALITIES",
    "ChatCompletionRequest",
    "ChatMessage",
    "GenerationDefaults",
    "ImageEditRequest",
    "ImageGenerationRequest",
    "chat_documents",
    "check_model",
    "chunk",
    "completion_id",
    "conversation",
    "document_seeds",
    "edit_picture_limit",
    "edit_request",
    "finish_reason",
    "image_part",
    "message_content",
    "now",
    "parse_request",
    "picture_size",
    "usage",
]
