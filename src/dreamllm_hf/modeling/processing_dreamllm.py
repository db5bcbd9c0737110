"""DreamLLM processor: the LLM's tokenizer (the legacy LLaMA one for the release) plus the vision tower's image
preprocessing (CLIP, SigLIP), with the original's block expansion."""

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import ImageInput, load_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import PaddingStrategy

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
# The tokenizer's per-token outputs the processor expands with the ids (each block token repeats the value of the
# placeholder it replaces) and the value a padding position gets.
_PER_TOKEN_PADDING = {"token_type_ids": 0, "special_tokens_mask": 1, "offset_mapping": (0, 0)}


class DreamLLMProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    The keyword arguments of [`DreamLLMProcessor.__call__`], typed and merged as transformers' processors merge theirs
    (`ProcessorMixin._merge_kwargs`): the tokenizer's (`text_kwargs`: `padding`, `padding_side`, `max_length`,
    `pad_to_multiple_of`, `add_special_tokens`, `return_offsets_mapping`, ...), the image processor's
    (`images_kwargs`: `do_rescale`, `do_resize`, `size`, ...), `return_tensors` for both, and
    `return_mm_token_type_ids` (1 at the image slots, the positions that receive a picture's features). They may be
    given flat or per modality (`text_kwargs={...}`). Where none is given, the tokenizer's saved settings apply, then
    the processor's defaults (`DreamLLMProcessor.text_kwargs`: pad to the longest row, on the left).
    """


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

    valid_processor_kwargs = DreamLLMProcessorKwargs
    # A batch is padded to its longest row, on the left (where generation continues), unless the tokenizer's saved
    # settings or the call say otherwise.
    text_kwargs = {"padding": True, "padding_side": "left"}
    # The text placeholder of a picture that is read; `<dream>` (`dream_token`) is a picture that was drawn. Both take
    # one picture of `images`. Fixed by the DreamLLM format, so not a constructor argument.
    image_token = C.IMAGE_PLACEHOLDER
    dream_token = C.DREAM_PLACEHOLDER

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
        self.image_token_id = self.special_token_ids[self.image_token]
        self.dream_token_id = self.special_token_ids[self.dream_token]

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
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[DreamLLMProcessorKwargs],
    ):
        r"""
        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str`, or a list of those, *optional*):
                PIL images, numpy arrays or tensors (HWC or CHW), or paths/URLs: one, a flat list in reading order over
                the batch, or one list per prompt. One picture per `<image>` and per `<dream>`.
            text (`str` or `list[str]`, *optional*):
                One prompt or a batch of prompts; `<image>` and `<dream>` mark the pictures.
            **kwargs ([`DreamLLMProcessorKwargs`]):
                The tokenizer's and the image processor's options, and `return_tensors` (`"pt"`, `"np"` or `None`
                for lists). Padding (`padding`, `padding_side`, `max_length`, `pad_to_multiple_of`) applies to the
                expanded ids; nothing is truncated, since a cut would split an image block.

        Returns:
            [`BatchFeature`]: `input_ids` and `attention_mask` (when there is text; also the tokenizer's
            `offset_mapping`, `token_type_ids` and `special_tokens_mask` when asked, each block token with the value of
            its placeholder, and `mm_token_type_ids` with `return_mm_token_type_ids=True`) and `pixel_values` (when
            there are images).
        """
        for unsupported in ("videos", "audio"):  # apply_chat_template passes them as None
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"DreamLLM takes no {unsupported}.")
        if text is None and images is None:
            raise ValueError("Pass `text`, `images` or both.")
        output_kwargs = self._merge_kwargs(
            DreamLLMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.setdefault("return_tensors", return_tensors)

        data = {}
        images_per_prompt = None
        if text is not None:
            prompts = self._as_prompt_list(text)
            data, images_per_prompt = self._encode_text(
                prompts, text_kwargs, output_kwargs.get("return_mm_token_type_ids"), return_tensors
            )
            if output_kwargs.get("return_text_replacement_offsets"):
                # The placeholders are expanded at the id level: the text is not rewritten, and `offset_mapping`
                # points into it as written.
                data["text_replacement_offsets"] = [[] for _ in prompts]

        # The 8-bit conversion makes the image processor's rescale right; a caller who turns the rescale off gives
        # pixels at the scale the tower reads, and they go as they are.
        rescales = images_kwargs.get("do_rescale", getattr(self.image_processor, "do_rescale", True))
        flat_images = self._flatten_images(images, images_per_prompt, to_eight_bit=rescales is not False)
        if flat_images:
            data["pixel_values"] = self.image_processor(flat_images, **images_kwargs)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _encode_text(self, prompts: list[str], text_kwargs: dict, return_mm_token_type_ids, return_tensors):
        """The prompts' ids with every placeholder expanded, and the tokenizer's other per-token outputs expanded with
        them, padded as `text_kwargs` ask; and the number of pictures each prompt takes."""
        truncation = text_kwargs.pop("truncation", None)
        if truncation not in (None, False, "do_not_truncate") or text_kwargs.get("return_overflowing_tokens"):
            raise ValueError("Truncation is not supported: it could cut an image or dream block in half.")
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets", "return_overflowing_tokens"):
            text_kwargs.pop(key, None)  # the processor's own options (transformers mirrors them into text_kwargs)
        padding = text_kwargs.pop("padding", False)
        padding_side = text_kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        max_length = text_kwargs.pop("max_length", None)
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", None)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.tokenizer.model_input_names
        return_length = text_kwargs.pop("return_length", False)

        encoded = self.tokenizer(prompts, padding=False, return_attention_mask=False, **text_kwargs)
        per_token = [key for key in _PER_TOKEN_PADDING if key in encoded]
        rows = []
        for prompt, *values in zip(prompts, encoded["input_ids"], *(encoded[key] for key in per_token)):
            start = self._duplicate_bos(prompt, values[0])
            rows.append(dict(zip(["input_ids", *per_token], (list(v)[start:] for v in values))))
        images_per_prompt = [
            sum(token_id in (self.image_token_id, self.dream_token_id) for token_id in row["input_ids"])
            for row in rows
        ]

        expanded = []
        for row in rows:
            counts = [len(self._block_of(token_id)) for token_id in row["input_ids"]]
            out = {key: [v for v, n in zip(row[key], counts) for _ in range(n)] for key in per_token}
            out["input_ids"] = self.expand_placeholders(row["input_ids"])
            out["attention_mask"] = [1] * len(out["input_ids"])
            if return_mm_token_type_ids:
                out["mm_token_type_ids"] = self._image_slot_mask(row["input_ids"])
            expanded.append(out)
        lengths = [len(out["input_ids"]) for out in expanded]
        width = self._padded_width(lengths, padding, max_length, pad_to_multiple_of)
        if width is not None:
            pad_values = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
            pad_values.update({key: _PER_TOKEN_PADDING[key] for key in per_token})
            if pad_values["input_ids"] is None and any(length < width for length in lengths):
                raise ValueError(
                    "The tokenizer has no pad token to pad the batch with; set `tokenizer.pad_token`, or pass "
                    "`padding=False` (one prompt, or prompts of one length)."
                )
            for out in expanded:
                for key, values in out.items():
                    fill = [pad_values[key]] * (width - len(values))
                    out[key] = fill + values if padding_side == "left" else values + fill

        data = {key: [out[key] for out in expanded] for key in expanded[0]} if expanded else {"input_ids": []}
        if not return_attention_mask:
            data.pop("attention_mask", None)
        if return_length:
            data["length"] = lengths
        # Explicit dtypes: a batch of empty prompts (an LLM without BOS, e.g. Qwen, on "") would become float.
        for key in set(data) - {"offset_mapping", "length"}:
            if return_tensors == "pt":
                data[key] = torch.tensor(data[key], dtype=torch.long)
            elif return_tensors == "np":
                data[key] = np.array(data[key], dtype=np.int64)
        return data, images_per_prompt

    @staticmethod
    def _padded_width(lengths: list[int], padding, max_length: int | None, pad_to_multiple_of: int | None):
        """The length every row is padded to (`None`: no padding), as the tokenizer's `pad` reads `padding`."""
        strategy = PaddingStrategy.LONGEST if padding is True else PaddingStrategy(padding or "do_not_pad")
        if strategy == PaddingStrategy.DO_NOT_PAD or not lengths:
            return None
        width = max(lengths)
        if strategy == PaddingStrategy.MAX_LENGTH:
            if max_length is None:
                raise ValueError("`padding='max_length'` needs a `max_length`.")
            if width > max_length:
                raise ValueError(
                    f"A prompt takes {width} tokens with its pictures' blocks, more than `max_length` {max_length}; "
                    "nothing is truncated (a cut would split a block): raise `max_length` or shorten the prompt."
                )
            width = max_length
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        return width

    def _duplicate_bos(self, prompt: str, ids: list[int]) -> int:
        """1 where the tokenizer adds a BOS and the text (a chat template that writes `{{ bos_token }}`, as Llama 3's
        and Gemma's do) already begins with one: dropping it gives what `apply_chat_template(tokenize=True)` gives."""
        bos, bos_id = self.tokenizer.bos_token, self.tokenizer.bos_token_id
        return int(bool(bos) and prompt.startswith(bos) and list(ids[:2]) == [bos_id, bos_id])

    def _block_of(self, token_id: int) -> list[int]:
        """What `token_id` stands for in the model's input: a placeholder's block, any other token itself."""
        if token_id == self.image_token_id:
            return self.image_block_ids
        if token_id == self.dream_token_id:
            return self.drawn_picture_ids
        return [token_id]

    def expand_placeholders(self, ids: list[int]) -> list[int]:
        """Replaces every `<image>` id by an image block and every `<dream>` id by a dream block + an image block."""
        return [expanded for token_id in ids for expanded in self._block_of(token_id)]

    def _image_slot_mask(self, ids: list[int]) -> list[int]:
        """1 at the slots of the image blocks `ids` expand into (where a picture's features are written), 0 elsewhere
        (the dream queries' slots included): `mm_token_type_ids`."""
        image_slots = [0, *[1] * self.num_image_tokens, 0]
        mask = []
        for token_id in ids:
            if token_id == self.image_token_id:
                mask.extend(image_slots)
            elif token_id == self.dream_token_id:
                mask.extend([0] * len(self.dream_block_ids) + image_slots)
            else:
                mask.append(0)
        return mask

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """
        The tokens each picture takes in the model's input, whatever its size (every picture is resized to the tower's
        input size): `num_image_tokens` image slots (what `mm_token_type_ids` marks), in one patch.

        Args:
            image_sizes (`list[list[int]]`, *optional*):
                The (height, width) of each picture.
        """
        if image_sizes is None:
            return MultiModalData()
        count = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * count, num_image_patches=[1] * count)

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
        placeholder_ids = (self.image_token_id, self.dream_token_id)
        self._flatten_images(images, [sum(ids.count(p) for p in placeholder_ids) for ids in token_ids])

    def _flatten_images(self, images, images_per_prompt: list[int] | None, to_eight_bit: bool = True) -> list:
        """The pictures as one flat list in reading order, checked against the placeholders of each prompt (and made
        8-bit unless `to_eight_bit=False`: see `_readable_picture`)."""
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
        flat = [_readable_picture(image, number, to_eight_bit) for number, image in enumerate(flat)]
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


def _readable_picture(image, number: int, to_eight_bit: bool = True):
    """
    Picture `number` as the CLIP image processor reads it right. 8-bit pictures (PIL in any 8-bit mode: RGB, RGBA,
    L, P, ...; uint8 arrays) pass as they are. The others become 8-bit arrays: 16-bit (uint16 arrays, PIL `I;16`/`I`)
    scaled by 1/257, floats in [0, 1] scaled by 255 (the image processor would take them for [0, 255] and read a
    black picture), floats in [0, 255] rounded, booleans as black and white. Empty pictures, non-finite values and
    values outside those ranges are refused, as are arrays that are not HW, HWC or CHW with 1, 3 or 4 channels. With
    `to_eight_bit=False` (the image processor does not rescale) the pixels keep their values: only the shape and
    emptiness are checked.
    """
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"Picture {number} is empty ({image.width}x{image.height} pixels).")
        if to_eight_bit and image.mode in _SIXTEEN_BIT_MODES + _FLOAT_MODES:
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
    if not to_eight_bit or (image.dtype in (np.uint8, torch.uint8) and image.ndim == 3):
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


__all__ = ["DreamLLMProcessor", "DreamLLMProcessorKwargs", "rgb_picture"]
