"""DreamLLM processor: the LLM's tokenizer (the legacy LLaMA one for the release) plus the vision tower's image
preprocessing (CLIP, SigLIP), with the original's block expansion."""

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin

from .. import constants as C
from ..checks import InputTypeError
from .configuration_dreamllm import CLIP_VIT_L_14_VISION_CONFIG


DEFAULT_NUM_IMAGE_TOKENS = (
    CLIP_VIT_L_14_VISION_CONFIG["image_size"] // CLIP_VIT_L_14_VISION_CONFIG["patch_size"]
) ** 2
_SINGLE_IMAGE_TYPES = (Image.Image, np.ndarray, torch.Tensor, str)
# PIL modes whose pixels are not 8-bit: PIL's own `convert("RGB")` clips them (a 16-bit picture turns white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FLOAT_MODES = ("F",)
_CHANNELS = (1, 3, 4)


class DreamLLMProcessor(ProcessorMixin):
    r"""
    Turns prompts and pictures into DreamLLM inputs.

    The text is tokenized as the original does (BOS + text, legacy SentencePiece for the release; the LLM's own
    tokenizer for a model built from another LLM), then every placeholder id is expanded at the id level, as the
    original's `truncate_and_replace`:

    * `<image>` -> `<im_start>` + `<im_patch>` x `num_image_tokens` + `<im_end>`;
    * `<dream>` -> `<dream_start>` + `<im_patch>` x `num_dream_queries` + `<dream_end>`, followed by an image block
      (a created picture is always re-read by CLIP).

    Every `<image>` and every `<dream>` takes one picture, in reading order over the batch; for `<dream>` it is the
    picture that was created there.

    Args:
        image_processor (`CLIPImageProcessor`, `SiglipImageProcessor`, ...): the vision tower's preprocessing.
        tokenizer (`PreTrainedTokenizerFast`): the legacy-exact tokenizer (see `dreamllm_hf.conversion.tokenizer`), or
            the LLM's own tokenizer with the DreamLLM tokens added (see `dreamllm_hf.building`).
        num_image_tokens (`int`, defaults to 256): `<im_patch>` slots per picture, one per patch of the tower.
        num_dream_queries (`int`, defaults to 64): `<im_patch>` slots per dream block, one per dream query.
        chat_template (`str`, *optional*): defaults to the Vicuna v1.1 template of training (a model built from another
            LLM keeps that LLM's template).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        num_dream_queries: int = C.NUM_DREAM_QUERIES,
        chat_template: str | None = None,
    ):
        self.num_image_tokens = num_image_tokens
        self.num_dream_queries = num_dream_queries
        if chat_template is None:
            chat_template = C.VICUNA_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.special_token_ids = self._lookup_special_token_ids(tokenizer)

    @staticmethod
    def _lookup_special_token_ids(tokenizer) -> dict[str, int]:
        vocab = tokenizer.get_vocab()
        missing = [token for token in C.FORMAT_TOKENS if token not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the DreamLLM special tokens {missing}; build it with the release's added tokens."
            )
        return {token: vocab[token] for token in C.FORMAT_TOKENS}

    @property
    def image_block_ids(self) -> list[int]:
        """`<im_start>` + `<im_patch>` x num_image_tokens + `<im_end>`."""
        ids = self.special_token_ids
        return [ids[C.IMAGE_START_TOKEN], *[ids[C.IMAGE_PATCH_TOKEN]] * self.num_image_tokens, ids[C.IMAGE_END_TOKEN]]

    @property
    def dream_block_ids(self) -> list[int]:
        """`<dream_start>` + `<im_patch>` x num_dream_queries + `<dream_end>` (without the image block that follows)."""
        ids = self.special_token_ids
        return [ids[C.DREAM_START_TOKEN], *[ids[C.IMAGE_PATCH_TOKEN]] * self.num_dream_queries, ids[C.DREAM_END_TOKEN]]

    @property
    def drawn_picture_ids(self) -> list[int]:
        """A drawn picture in the token stream (what `<dream>` expands to): its dream block, then the image block it
        is read back through."""
        return self.dream_block_ids + self.image_block_ids

    def check_model_config(self, config) -> None:
        """
        Raises `ValueError` unless the model of `config` reads pictures in this processor's layout: the same image and
        dream slots, the same special token ids (a pipeline writes drawn pictures with the processor's ids into what
        the model reads).

        Args:
            config ([`DreamLLMConfig`]): the model's configuration.
        """
        slots = (self.num_image_tokens, self.num_dream_queries)
        if slots != (config.num_image_tokens, config.num_dream_queries):
            raise ValueError(
                f"The processor expands a picture into {slots[0]} image slots and a dream into {slots[1]} query "
                f"slots, but the model reads {config.num_image_tokens} and {config.num_dream_queries}; use the "
                "processor saved with this model."
            )
        model_ids = config.special_token_ids
        different = {
            token: (i, model_ids[token]) for token, i in self.special_token_ids.items() if model_ids[token] != i
        }
        if different:
            raise ValueError(
                f"The processor's special token ids differ from the model's (token: (processor, model)): {different}; "
                "use the processor saved with this model."
            )

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        return_tensors: str | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text (`str` or `list[str]`, *optional*):
                One prompt or a batch of prompts; `<image>` and `<dream>` mark the pictures.
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, or a list of those, *optional*):
                PIL images, numpy arrays or tensors (HWC or CHW), or paths/URLs: one, a flat list in reading order over
                the batch, or one list per prompt. One picture per `<image>` and per `<dream>`.
            return_tensors (`str`, *optional*):
                `"pt"`, `"np"` or `None` (lists).
            padding (`bool` or `str`, *optional*, defaults to `True`):
                Pad the expanded ids to the longest row (`True` or `"longest"`) or to `max_length` (`"max_length"`).
            padding_side (`str`, *optional*, defaults to `"left"`):
                `"left"` (for generation) or `"right"`.
            pad_to_multiple_of (`int`, *optional*):
                Pad each row's length up to a multiple of this.
            max_length (`int`, *optional*):
                The length `padding="max_length"` pads to. It only pads: nothing is truncated, since a cut would split
                an image block.
            **kwargs:
                Passed to the tokenizer (for example `add_special_tokens=False`).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` (when there is text) and `pixel_values` (when there
            are images).
        """
        for unsupported in ("videos", "audio"):  # apply_chat_template passes them as None
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"DreamLLM takes no {unsupported}.")
        if kwargs.get("truncation"):
            raise ValueError("Truncation is not supported: it could cut an image or dream block in half.")
        kwargs.pop("truncation", None)
        if text is None and images is None:
            raise ValueError("Pass `text`, `images` or both.")

        data = {}
        images_per_prompt = None
        if text is not None:
            prompts = self._as_prompt_list(text)
            token_ids = self.tokenizer(prompts, padding=False, return_attention_mask=False, **kwargs)["input_ids"]
            token_ids = [self._single_bos(prompt, ids) for prompt, ids in zip(prompts, token_ids)]
            placeholder_ids = (
                self.special_token_ids[C.IMAGE_PLACEHOLDER],
                self.special_token_ids[C.DREAM_PLACEHOLDER],
            )
            images_per_prompt = [sum(ids.count(p) for p in placeholder_ids) for ids in token_ids]
            expanded = [self.expand_placeholders(ids) for ids in token_ids]
            padded = self.tokenizer.pad(
                {"input_ids": expanded, "attention_mask": [[1] * len(ids) for ids in expanded]},
                padding=padding,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
            )
            input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
            # Explicit dtypes: a batch of empty prompts (an LLM without BOS, e.g. Qwen, on "") would become float.
            if return_tensors == "pt":
                input_ids, attention_mask = (torch.tensor(v, dtype=torch.long) for v in (input_ids, attention_mask))
            elif return_tensors == "np":
                input_ids, attention_mask = (np.array(v, dtype=np.int64) for v in (input_ids, attention_mask))
            data.update(input_ids=input_ids, attention_mask=attention_mask)

        flat_images = self._flatten_images(images, images_per_prompt)
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _single_bos(self, prompt: str, ids: list[int]) -> list[int]:
        """One BOS where the tokenizer adds one and the text (a chat template that writes `{{ bos_token }}`, as Llama 3's
        and Gemma's do) already begins with it: what `apply_chat_template(tokenize=True)` gives."""
        bos, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        if bos and prompt.startswith(bos) and ids[:2] == [bos_id, bos_id]:
            return ids[1:]
        return ids

    def expand_placeholders(self, ids: list[int]) -> list[int]:
        """Replaces every `<image>` id by an image block and every `<dream>` id by a dream block + an image block."""
        image_id, dream_id = self.special_token_ids[C.IMAGE_PLACEHOLDER], self.special_token_ids[C.DREAM_PLACEHOLDER]
        image_block, drawn_picture = self.image_block_ids, self.drawn_picture_ids
        expanded = []
        for token_id in ids:
            if token_id == image_id:
                expanded.extend(image_block)
            elif token_id == dream_id:
                expanded.extend(drawn_picture)
            else:
                expanded.append(token_id)
        return expanded

    @staticmethod
    def _as_prompt_list(text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and all(isinstance(prompt, str) for prompt in text):
            return list(text)
        raise InputTypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")

    def check_images(self, text: str | list[str], images) -> None:
        """
        Refuses pictures that would fail or be read wrong, before any model work: a count that does not match the
        placeholders of `text`, an unsupported type, an empty or oddly shaped array, values out of range. `__call__`
        makes the same checks; a pipeline calls this one first when it has model work to do before tokenizing.
        """
        prompts = self._as_prompt_list(text)
        token_ids = self.tokenizer(prompts, padding=False, return_attention_mask=False)["input_ids"]
        placeholder_ids = (self.special_token_ids[C.IMAGE_PLACEHOLDER], self.special_token_ids[C.DREAM_PLACEHOLDER])
        self._flatten_images(images, [sum(ids.count(p) for p in placeholder_ids) for ids in token_ids])

    def _flatten_images(self, images, images_per_prompt: list[int] | None) -> list:
        """The pictures as one flat list in reading order, checked against the placeholders of each prompt."""
        if images is None:
            images = []
        if isinstance(images, _SINGLE_IMAGE_TYPES):
            images = [images]
        if isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images):
            if not all(isinstance(item, (list, tuple)) for item in images):
                raise ValueError("`images` mixes pictures and lists: give one flat list, or one list per prompt.")
            if images_per_prompt is not None:
                if len(images) != len(images_per_prompt):
                    raise ValueError(
                        f"`images` has {len(images)} per-prompt lists but there are {len(images_per_prompt)} prompts; "
                        "give one list per prompt (an empty list for a prompt without pictures)."
                    )
                for index, (given, needed) in enumerate(zip(images, images_per_prompt)):
                    if len(given) != needed:
                        raise ValueError(
                            f"Prompt {index} has {needed} `<image>`/`<dream>` placeholders but {len(given)} pictures "
                            "were given for it; give one picture per placeholder, or change the placeholders."
                        )
            images = [image for per_prompt in images for image in per_prompt]
        elif not isinstance(images, (list, tuple)):
            raise InputTypeError(
                f"Unsupported image type {type(images).__name__}: pass PIL images, numpy arrays, torch tensors or "
                "paths/URLs, one, a list, or one list per prompt."
            )

        flat = []
        for image in images:
            flat.extend(_split_image_batch(image))
        flat = [_readable_picture(image, number) for number, image in enumerate(flat)]
        if images_per_prompt is not None and len(flat) != sum(images_per_prompt):
            raise ValueError(
                f"The prompts have {sum(images_per_prompt)} `<image>`/`<dream>` placeholders but {len(flat)} pictures "
                "were given; give one picture per placeholder (a `<dream>` takes the picture created there), or "
                "change the placeholders."
            )
        return flat


def _is_array(image) -> bool:
    return isinstance(image, (np.ndarray, torch.Tensor))


def _split_image_batch(image) -> list:
    """One picture as a list of one; a 4-D array/tensor as its pictures; a path/URL loaded; anything else refused."""
    if isinstance(image, str):
        return [load_image(image)]
    if isinstance(image, Image.Image):
        return [image]
    if _is_array(image) and image.ndim in (2, 3):
        return [image]
    if _is_array(image) and image.ndim == 4:
        return list(image)
    shape = f" of shape {tuple(image.shape)}" if _is_array(image) else ""
    raise InputTypeError(
        f"Unsupported image type {type(image).__name__}{shape}: pass PIL images, numpy arrays or torch tensors "
        "(HW, HWC or CHW; NHWC/NCHW for several) or paths/URLs."
    )


def _readable_picture(image, number: int):
    """
    Picture `number` as the CLIP image processor reads it right. 8-bit pictures (PIL in any 8-bit mode: RGB, RGBA,
    L, P, ...; uint8 arrays) pass as they are. The others become 8-bit arrays: 16-bit (uint16 arrays, PIL `I;16`/`I`)
    scaled by 1/257, floats in [0, 1] scaled by 255 (the image processor would take them for [0, 255] and read a
    black picture), floats in [0, 255] rounded, booleans as black and white. Empty pictures, non-finite values and
    values outside those ranges are refused, as are arrays that are not HW, HWC or CHW with 1, 3 or 4 channels.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"Picture {number} is empty ({image.width}x{image.height} pixels).")
        if image.mode in _SIXTEEN_BIT_MODES + _FLOAT_MODES:
            return _eight_bit(np.asarray(image)[..., None], number, sixteen_bit=image.mode in _SIXTEEN_BIT_MODES)
        return image
    if not _is_array(image):  # a path or URL, loaded by `_split_image_batch`
        return image
    shape = tuple(image.shape)
    if 0 in shape:
        raise ValueError(f"Picture {number} is empty: an array of shape {shape}.")
    if image.ndim == 3 and shape[-1] not in _CHANNELS and shape[0] not in _CHANNELS:
        raise ValueError(
            f"Picture {number} has shape {shape}: expected HW, HWC or CHW with 1, 3 or 4 channels (gray, RGB, RGBA)."
        )
    if image.dtype in (np.uint8, torch.uint8) and image.ndim == 3:
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    return _eight_bit(image if image.ndim == 3 else image[..., None], number)


def rgb_picture(image: Image.Image) -> Image.Image:
    """A PIL picture as 8-bit RGB, as the processor reads it: 16-bit and float pictures are scaled (PIL's own
    `convert("RGB")` clips them: a 16-bit picture turns white)."""
    if image.mode in _SIXTEEN_BIT_MODES + _FLOAT_MODES:
        image = Image.fromarray(_eight_bit(np.asarray(image), 0, sixteen_bit=image.mode in _SIXTEEN_BIT_MODES))
    return image.convert("RGB")


def _eight_bit(array: np.ndarray, number: int, sixteen_bit: bool = False) -> np.ndarray:
    """A picture array as uint8 (see `_readable_picture`)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "uif":
        raise InputTypeError(
            f"Picture {number} has dtype {array.dtype}: give uint8 or uint16 pixels, or floats in [0, 1] or [0, 255]."
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"Picture {number} holds NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if array.dtype == np.uint16 or sixteen_bit:
        if low < 0 or high > 65535:
            raise ValueError(f"Picture {number} is 16-bit but has values in [{low:g}, {high:g}], not [0, 65535].")
        return np.round(array.astype(np.float64) / 257).astype(np.uint8)
    if array.dtype.kind == "f" and low >= 0 and high <= 1:
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    if low < 0 or high > 255:
        raise ValueError(
            f"Picture {number} has values in [{low:g}, {high:g}]; give 8-bit values in [0, 255], floats in [0, 1] or "
            "uint16 (16-bit). A normalized tensor (in [-1, 1], or after mean/std) must be turned back into pixels."
        )
    return np.round(array).astype(np.uint8)


__all__ = ["DreamLLMProcessor", "rgb_picture"]
