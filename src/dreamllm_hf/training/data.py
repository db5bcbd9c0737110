"""DreamLLM training data: image-caption pairs and interleaved documents, read with `datasets`.

Two kinds of sources, told apart by their columns:

* **pairs** (`image` + `text`; also `jpg`/`png`/`webp` + `caption`/`txt`, as webdataset shards name them). Each pair
  becomes, with probability `i2t_probability` (1/2, as the original), an image-to-text sample
  `<s> <im_start> <im_patch>*N <im_end> caption </s>` (the caption and `</s>` are learned), otherwise a text-to-image
  sample `<s> caption <dream_start> <im_patch>*Q <dream_end> </s>` (nothing learned by the LM; the picture is the
  diffusion target of the dream block).
* **documents** in the MMC4 schema (`text_list`, `image_info: [{image_name, matched_text_index}]`, and optionally an
  `images` column aligned with `image_info`). Images are sorted by `matched_text_index`; the sentences are merged so
  that image k follows its matched sentence; every image becomes a dream block (creation) immediately followed by an
  image block (the picture re-read by CLIP):
  `<s> text <dream_start> <im_patch>*Q <dream_end> <im_start> <im_patch>*N <im_end> text ... </s>`.
  Everything but `<im_patch>`, `<im_start>`, `<im_end>` and `<dream_end>` is learned (so the text, `<dream_start>` and
  `</s>`). Text segments that would pass `max_length` end the document, as in the original. A document may carry an
  `instruction` (the original's instruction-led `mmc4_instruct` data): it goes first, as the chat prompt of a user
  turn asking for the document, and is context only (not learned).
* **conversations** (`messages`: chat turns, each `{"role", "content"}`, the content a string or a list of
  `{"type": "text", "text"}` / `{"type": "image", "image": PATH}` parts; optionally an `images` column that fills
  `{"type": "image"}` parts without a path, in reading order): tokenized by the processor's chat template exactly as
  the pipeline reads a conversation (`DreamLLMSampleBuilder.conversation`). A picture in a user turn is read (an
  image block), a picture in an assistant turn is drawn (a dream block, its diffusion target, then read back). Every
  assistant turn is learned; the system prompt and the user turns are context.

Every picture is prepared twice: at the CLIP size by the processor's image processor (`pixel_values`, one per
`<im_start>`) and at the diffusion size (`diffusion_pixel_values`, one per `<dream_start>`): resize the shorter edge
(bilinear), centre crop, random horizontal flip, scale to [-1, 1] - the original's SD transform, done with PIL.

Local layouts, in the ecosystem's conventions (`load_data_source` tells them apart):

* a folder with `metadata.jsonl` (`file_name` + `text`): `datasets`' `imagefolder` -> pairs;
* JSON Lines in the MMC4 schema or of conversations (a `.jsonl` file, or a folder of them), picture paths relative to
  the file's folder;
* Parquet shards (a `.parquet` file, a folder of them, or a glob) with either schema and the pictures embedded
  (`write_parquet_shards` writes them from any of the above);
* webdataset tar shards of pairs (`.tar`), through `datasets`' `webdataset` loader.

All randomness (the i2t/t2i choice and the flips) comes from a generator seeded by `(seed, epoch, index)`, so a
sample is the same whichever worker or process builds it, and a resumed run sees the same data.

Bad records: a record that cannot make a sample (a pair without its text or with a picture that cannot be opened, a
document without its `text_list`, or whose `matched_text_index` points at no sentence) is a `ValueError` naming the
source and the record (`DreamLLMDataset` checks it when the record is read). A picture of a document that cannot be
opened is left out with its blocks, as the original does, and counted: the sample lists it in `skipped_pictures`,
the collator sums the batch's, and the trainer writes the count in its log.
"""

import bisect
import glob as globlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import constants as C
from ..modeling.processing_dreamllm import rgb_picture


logger = logging.getLogger(__name__)

PAIRS = "pairs"
DOCUMENTS = "documents"
CONVERSATIONS = "conversations"
IGNORE_INDEX = -100
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
TEXT_COLUMNS = ("text", "caption", "txt")
DOCUMENT_COLUMNS = ("text_list", "image_info")
CONVERSATION_COLUMN = "messages"
# Tokens of the format whose labels are -100 in every sample: the slots, the image delimiters and `<dream_end>`.
UNLEARNED_TOKENS = (C.IMAGE_PATCH_TOKEN, C.IMAGE_START_TOKEN, C.IMAGE_END_TOKEN, C.DREAM_END_TOKEN)
# What opening a missing, truncated or hostile picture file raises (PIL plugins raise SyntaxError on some).
PICTURE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------------


def load_image(value, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """A picture as an RGB PIL image, from a PIL image, `datasets` image storage (`{"bytes", "path"}`), bytes or a
    path (relative paths are taken from `base_dir`)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            return load_image(value["path"], base_dir)
        else:
            raise ValueError("An image entry has neither `bytes` nor `path`.")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        image = Image.open(path)
    else:
        raise ValueError(f"Cannot read a picture from {type(value).__name__}.")
    image.load()
    return rgb_picture(image)


class DiffusionImageTransform:
    """
    The original's Stable Diffusion transform, without torchvision: resize the shorter edge to `resolution` (PIL
    bilinear), centre crop `resolution` x `resolution`, flip horizontally (when asked), scale to [-1, 1] (CHW float32).
    """

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        size = self.resolution
        width, height = image.size
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.BILINEAR)
        top = int(round((new_height - size) / 2.0))
        left = int(round((new_width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return (tensor - 0.5) / 0.5


# --------------------------------------------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------------------------------------------


def merge_text_list(text_list: Sequence[str], matched_text_index: Sequence[int]) -> list[str]:
    """Sentences merged (space-joined) so that segment k ends with the sentence image k is matched to, plus the rest.

    `matched_text_index` must be sorted. Two images on the same sentence give an empty segment between them.
    """
    segments, start = [], 0
    for index in matched_text_index:
        segments.append(" ".join(text_list[start : index + 1]))
        start = index + 1
    if start != len(text_list):
        segments.append(" ".join(text_list[start:]))
    return segments


class DreamLLMSampleBuilder:
    """
    Turns pairs and documents into DreamLLM training samples: `input_ids`, `labels`, `pixel_values` (CLIP size, one
    per `<im_start>`) and `diffusion_pixel_values` (diffusion size, one per `<dream_start>`).

    Args:
        processor ([`DreamLLMProcessor`]): tokenizer, CLIP image processor and the block layouts.
        diffusion_resolution (`int`): side of the diffusion pictures (512 for SD 2.1-base: the UNet's `sample_size`
            times the VAE's scale factor).
        max_length (`int`, *optional*): longest sample (default: the tokenizer's `model_max_length`, 2048).
        i2t_probability (`float`, defaults to 0.5): chance that a pair becomes image-to-text (else text-to-image);
            1 or 0 force one task (the original's comprehension-only / creation-only stage I).
        random_flip (`bool`, defaults to True): random horizontal flip of the diffusion pictures.
        seed (`int`, defaults to 0): seeds the per-sample generator, with the epoch and the sample index.
        caption_dropout (`float`, defaults to 0): chance that a text-to-image pair loses its caption (`<s>` + the
            dream block): what classifier-free guidance reads as its unconditional then means "any picture".
    """

    def __init__(
        self,
        processor,
        diffusion_resolution: int,
        max_length: int | None = None,
        i2t_probability: float = 0.5,
        random_flip: bool = True,
        seed: int = 0,
        caption_dropout: float = 0.0,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.diffusion_transform = DiffusionImageTransform(diffusion_resolution)
        self.max_length = max_length if max_length is not None else self.tokenizer.model_max_length
        if not 0.0 <= i2t_probability <= 1.0:
            raise ValueError(f"`i2t_probability` must be in [0, 1], got {i2t_probability}.")
        self.i2t_probability = i2t_probability
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1], got {caption_dropout}.")
        self.caption_dropout = caption_dropout
        self.random_flip = random_flip
        self.seed = seed
        ids = processor.special_token_ids
        self.bos_token_id = self.tokenizer.bos_token_id
        # What opens every sample: `<s>`, or nothing for an LLM without one (Qwen).
        self.bos = [] if self.bos_token_id is None else [self.bos_token_id]
        self.eos_token_id = self.tokenizer.eos_token_id
        self.image_block = processor.image_block_ids
        self.dream_block = processor.dream_block_ids
        self.unlearned_ids = frozenset(ids[token] for token in UNLEARNED_TOKENS)

    # -- pieces ------------------------------------------------------------------------------------------------------

    def rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator of sample `index` in `epoch`: the same in every worker and process."""
        return np.random.default_rng([self.seed, epoch, index])

    def tokenize(self, text: str) -> list[int]:
        """A text segment's ids without BOS, as the original (`tokenizer(text).input_ids[1:]`)."""
        ids = self.tokenizer(text)["input_ids"]
        if ids and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return list(ids)

    def labels_for(self, input_ids: list[int]) -> list[int]:
        return [IGNORE_INDEX if token in self.unlearned_ids else token for token in input_ids]

    def clip_pixels(self, images: list[Image.Image]) -> torch.Tensor | None:
        if not images:
            return None
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def diffusion_pixels(self, images: list[Image.Image], rng: np.random.Generator) -> torch.Tensor | None:
        if not images:
            return None
        flips = [bool(rng.random() < 0.5) if self.random_flip else False for _ in images]
        return torch.stack([self.diffusion_transform(image, flip) for image, flip in zip(images, flips)])

    # -- samples -----------------------------------------------------------------------------------------------------

    def image_to_text(self, image: Image.Image, text: str) -> dict:
        """`<s> IMG caption </s>`; the caption and `</s>` are learned."""
        room = self.max_length - len(self.image_block) - 2
        caption = self.tokenize(text)[: max(room, 0)]
        input_ids = [*self.bos, *self.image_block, *caption, self.eos_token_id]
        return {
            "input_ids": input_ids,
            "labels": self.labels_for(input_ids),
            "pixel_values": self.clip_pixels([image]),
            "diffusion_pixel_values": None,
        }

    def text_to_image(self, image: Image.Image, text: str, rng: np.random.Generator) -> dict:
        """`<s> caption DREAM </s>`; every label -100, the picture is the dream block's diffusion target."""
        room = self.max_length - len(self.dream_block) - 2
        caption = self.tokenize(text)[: max(room, 0)]
        input_ids = [*self.bos, *caption, *self.dream_block, self.eos_token_id]
        return {
            "input_ids": input_ids,
            "labels": [IGNORE_INDEX] * len(input_ids),
            "pixel_values": None,
            "diffusion_pixel_values": self.diffusion_pixels([image], rng),
        }

    def pair(self, image, text: str, rng: np.random.Generator, base_dir=None) -> dict:
        """A pair as image-to-text (probability `i2t_probability`) or text-to-image (its caption dropped with
        probability `caption_dropout`)."""
        image = load_image(image, base_dir)
        if rng.random() < self.i2t_probability:
            return self.image_to_text(image, text)
        if self.caption_dropout and rng.random() < self.caption_dropout:  # no draw when off: same samples as before
            text = ""
        return self.text_to_image(image, text, rng)

    def document(
        self,
        text_list: Sequence[str],
        images: Sequence,
        matched_text_index: Sequence[int],
        rng: np.random.Generator,
        base_dir=None,
        instruction: str | None = None,
    ) -> dict:
        """An interleaved document; `images[k]` (anything `load_image` reads) goes after sentence
        `matched_text_index[k]`. Pictures that cannot be read are left out (with their blocks), as in the original;
        the sample then lists them in `skipped_pictures` (which picture, and why). With an `instruction`, the document
        is the answer to it: the chat prompt of a user turn asking it comes first and is not learned."""
        if instruction:
            return self._instructed_document(text_list, images, matched_text_index, rng, base_dir, instruction)
        order = sorted(range(len(images)), key=lambda k: (matched_text_index[k], k))
        images = [images[k] for k in order]
        segments = merge_text_list([text.strip() for text in text_list], [matched_text_index[k] for k in order])
        block = self.processor.drawn_picture_ids
        body, pictures, skipped = [], [], []
        for index, segment in enumerate(segments):
            segment_ids = self.tokenize(segment)
            if len(body) + len(segment_ids) + 2 > self.max_length:
                break
            body.extend(segment_ids)
            if index < len(images):
                if len(body) + len(block) + 2 > self.max_length:
                    break
                try:
                    picture = load_image(images[index], base_dir)
                except PICTURE_ERRORS as error:  # a missing or corrupt picture drops its blocks, not the document
                    skipped.append(f"picture {order[index]} ({_describe_picture(images[index])}): {error}")
                    continue
                body.extend(block)
                pictures.append(picture)
        input_ids = [*self.bos, *body, self.eos_token_id]
        sample = {
            "input_ids": input_ids,
            "labels": self.labels_for(input_ids),
            "pixel_values": self.clip_pixels(pictures),
            "diffusion_pixel_values": self.diffusion_pixels(pictures, rng),
        }
        if skipped:
            sample["skipped_pictures"] = skipped
        return sample

    def _instructed_document(self, text_list, images, matched_text_index, rng, base_dir, instruction: str) -> dict:
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        text_list = list(text_list) or [""]
        text_list[0] = f"{prompt} {text_list[0].strip()}"
        sample = self.document(text_list, images, matched_text_index, rng, base_dir)
        prompt_ids = [*self.bos, *self.tokenize(prompt)]
        if sample["input_ids"][: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"The chat prompt of instruction {instruction!r} does not tokenize to a prefix.")
        sample["labels"][: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
        return sample

    def conversation(
        self, messages: Sequence[dict], rng: np.random.Generator, base_dir=None, images: Sequence | None = None
    ) -> dict:
        """
        A conversation, tokenized exactly as the pipeline reads one (the processor's chat template; see
        `dreamllm_hf.modeling.conversation`): a picture in a user turn is read (its CLIP block), a picture in an
        assistant turn is drawn (its dream block's diffusion target, then read back). Every assistant turn, `</s>`
        included, is learned (but the block tokens); the system prompt and the user turns are context. Picture paths
        are taken from `base_dir`; `images` fills the `{"type": "image"}` parts that name no picture, in order.
        """
        from ..modeling.conversation import render_conversation

        rendered, pictures = render_conversation(list(messages), list(images) if images is not None else None)
        chat = self.processor.apply_chat_template
        input_ids = self._expanded_ids(chat(rendered, tokenize=False))
        if len(input_ids) > self.max_length:
            raise ValueError(
                f"A conversation of {len(input_ids)} tokens is longer than `max_length` ({self.max_length}); "
                "shorten it or raise `max_length`."
            )
        labels = [IGNORE_INDEX] * len(input_ids)
        for index, message in enumerate(rendered):
            if message["role"] != "assistant":
                continue
            start = len(self._expanded_ids(chat(rendered[:index], add_generation_prompt=True, tokenize=False)))
            through = self._expanded_ids(chat(rendered[: index + 1], tokenize=False))
            if input_ids[: len(through)] != through:
                raise ValueError(
                    f"Turn {index} does not tokenize to a prefix of the conversation; check the chat template."
                )
            labels[start : len(through)] = self.labels_for(input_ids[start : len(through)])
        pictures = [load_image(picture, base_dir) for picture in pictures]
        # In reading order, every image block is a read picture unless a dream block comes right before it.
        dream_end = self.dream_block[-1]
        starts = [i for i, token in enumerate(input_ids) if token == self.image_block[0]]
        drawn = [picture for picture, i in zip(pictures, starts) if i > 0 and input_ids[i - 1] == dream_end]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.clip_pixels(pictures),
            "diffusion_pixel_values": self.diffusion_pixels(drawn, rng),
        }

    def _expanded_ids(self, text: str) -> list[int]:
        """BOS + `text`'s ids, `<image>` and `<dream>` expanded into their blocks (as the processor does)."""
        return self.processor.expand_placeholders(self.tokenizer(text)["input_ids"])


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DataSource:
    """One `datasets.Dataset` of pairs or documents, with where its relative image paths start."""

    dataset: object  # datasets.Dataset
    kind: str
    base_dir: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    path: str | None = None

    def __len__(self) -> int:
        return len(self.dataset)


def _first_present(columns, candidates) -> str | None:
    return next((name for name in candidates if name in columns), None)


def source_from_dataset(dataset, base_dir=None, path=None) -> DataSource:
    """Wraps a `datasets.Dataset` whose columns say what it is (pairs or MMC4-style documents)."""
    columns = set(dataset.column_names)
    if CONVERSATION_COLUMN in columns:
        return DataSource(dataset, CONVERSATIONS, base_dir=base_dir, path=path)
    if all(name in columns for name in DOCUMENT_COLUMNS):
        return DataSource(dataset, DOCUMENTS, base_dir=base_dir, path=path)
    image_column, text_column = _first_present(columns, IMAGE_COLUMNS), _first_present(columns, TEXT_COLUMNS)
    if image_column and text_column:
        return DataSource(dataset, PAIRS, base_dir, image_column, text_column, path)
    raise ValueError(
        f"Cannot tell what {path or 'the dataset'} holds from its columns {sorted(columns)}: pairs need an image "
        f"column ({', '.join(IMAGE_COLUMNS)}) and a text column ({', '.join(TEXT_COLUMNS)}); documents need "
        f"{' and '.join(DOCUMENT_COLUMNS)} (the MMC4 schema); conversations need {CONVERSATION_COLUMN}."
    )


def _files_with(path: Path, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))


def load_data_source(path: str | os.PathLike, cache_dir: str | None = None) -> DataSource:
    """
    Opens one local data source with `datasets`:

    * a folder with `metadata.jsonl` / `metadata.csv` -> `imagefolder` (pairs);
    * `.parquet` file(s), a folder of them or a glob -> `parquet` (pairs or documents, pictures embedded);
    * `.jsonl` / `.json` file(s) or a folder of them -> `json` (MMC4 documents or conversations; picture paths
      relative to the folder);
    * `.tar` file(s) or a folder of them -> `webdataset` (pairs, e.g. `jpg` + `txt`).
    """
    from datasets import load_dataset

    text = str(path)
    if any(char in text for char in "*?["):
        files = sorted(globlib.glob(text))
        if not files:
            raise FileNotFoundError(f"No file matches {text}.")
        base_dir = str(Path(files[0]).parent)
    else:
        location = Path(path)
        if not location.exists():
            raise FileNotFoundError(f"No data at {location}.")
        if location.is_dir():
            base_dir = str(location)
            if (location / "metadata.jsonl").exists() or (location / "metadata.csv").exists():
                dataset = load_dataset("imagefolder", data_dir=str(location), split="train", cache_dir=cache_dir)
                return source_from_dataset(dataset, base_dir, text)
            files = (
                _files_with(location, (".parquet",))
                or _files_with(location, (".jsonl", ".json"))
                or _files_with(location, (".tar",))
            )
            if not files:
                raise ValueError(f"{location} holds no metadata.jsonl (image folder), .parquet, .jsonl or .tar files.")
        else:
            files, base_dir = [str(location)], str(location.parent)

    suffix = Path(files[0]).suffix
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".tar": "webdataset"}.get(suffix)
    if builder is None:
        raise ValueError(f"Unsupported data file {files[0]}: use .parquet, .jsonl, .tar or an image folder.")
    dataset = load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    return source_from_dataset(dataset, base_dir, text)


def _describe_picture(value) -> str:
    """A picture entry as a message names it: its path, or what it is."""
    if isinstance(value, dict):
        value = value.get("path") or "(embedded bytes)"
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return f"({type(value).__name__})"


def _document_parts(record: dict, where: str) -> tuple[list[str], list, list[int]]:
    """`(text_list, images, matched_text_index)` of an MMC4 record, or a `ValueError` saying, at `where`, what is
    missing or points nowhere."""
    text_list = record.get("text_list")
    if not isinstance(text_list, (list, tuple)) or not text_list or not all(isinstance(t, str) for t in text_list):
        raise ValueError(
            f"{where}: no text (its 'text_list' is {text_list!r:.60}); a document needs a non-empty list of sentence "
            "strings."
        )
    infos = record.get("image_info") or []
    embedded = record.get("images")
    images, matched = [], []
    for k, info in enumerate(infos):
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if isinstance(index, float) and index.is_integer():  # a column with gaps is read as floats
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(text_list):
            raise ValueError(
                f"{where}: image_info[{k}] has matched_text_index {index!r}, which points at no sentence; the "
                f"document has {len(text_list)} (indices 0 to {len(text_list) - 1})."
            )
        picture = embedded[k] if embedded is not None and k < len(embedded) and embedded[k] is not None else None
        if picture is None:
            picture = info.get("image_name")
            if not isinstance(picture, str) or not picture:
                raise ValueError(f"{where}: image_info[{k}] has no image_name (and no embedded picture).")
        images.append(picture)
        matched.append(index)
    return list(text_list), images, matched


class DreamLLMDataset(torch.utils.data.Dataset):
    """
    Map-style dataset over one or more sources (concatenated), building each sample on access.

    `set_epoch(epoch)` changes the per-sample randomness (task choice, flips) from one epoch to the next; the training
    loop calls it before each epoch. Sample `index` of `epoch` is the same in every worker and process.
    """

    def __init__(self, sources: Sequence[DataSource], builder: DreamLLMSampleBuilder):
        if not sources:
            raise ValueError("No data source given.")
        self.sources = list(sources)
        self.builder = builder
        self.epoch = 0
        self._ends = np.cumsum([len(source) for source in self.sources]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        which = bisect.bisect_right(self._ends, index)
        source = self.sources[which]
        row = index - (self._ends[which - 1] if which else 0)
        where = f"{source.path or 'the data source'}, record {row}"
        try:
            record = source.dataset[row]
        except PICTURE_ERRORS as error:  # e.g. an image column `datasets` cannot decode
            raise ValueError(f"{where}: cannot be read ({error}).") from error
        rng = self.builder.rng(index, self.epoch)
        if source.kind == PAIRS:
            image, text = record[source.image_column], record[source.text_column]
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: no text (its {source.text_column!r} is {text!r:.40}); every pair needs a caption string "
                    "(an empty one trains the unconditional)."
                )
            try:
                image = load_image(image, source.base_dir)
            except PICTURE_ERRORS as error:
                raise ValueError(
                    f"{where}: its picture {_describe_picture(image)} cannot be opened ({error})."
                ) from error
            return self.builder.pair(image, text, rng, source.base_dir)
        if source.kind == CONVERSATIONS:
            return self.builder.conversation(
                record[CONVERSATION_COLUMN], rng, source.base_dir, images=record.get("images")
            )
        text_list, images, matched = _document_parts(record, where)
        sample = self.builder.document(
            text_list, images, matched, rng, source.base_dir, instruction=record.get("instruction")
        )
        for reason in sample.get("skipped_pictures", ()):
            logger.warning("%s: left out %s", where, reason)
        return sample


def build_training_dataset(
    data: Sequence[str | os.PathLike | DataSource],
    processor,
    diffusion_resolution: int,
    max_length: int | None = None,
    i2t_probability: float = 0.5,
    random_flip: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
    caption_dropout: float = 0.0,
) -> DreamLLMDataset:
    """Every source of `data` (paths as `load_data_source` reads them, or `DataSource`s) as one training dataset."""
    sources = [item if isinstance(item, DataSource) else load_data_source(item, cache_dir) for item in data]
    builder = DreamLLMSampleBuilder(
        processor,
        diffusion_resolution=diffusion_resolution,
        max_length=max_length,
        i2t_probability=i2t_probability,
        random_flip=random_flip,
        seed=seed,
        caption_dropout=caption_dropout,
    )
    return DreamLLMDataset(sources, builder)


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DreamLLMDataCollator:
    """
    Pads samples on the right into a batch: `input_ids` (pad id), `attention_mask` (0 on pads), `labels` (-100 on
    pads), and the pictures of all samples concatenated in reading order: `pixel_values` (one per `<im_start>`) and
    `diffusion_pixel_values` (one per `<dream_start>`), each left out when the batch has none. `skipped_pictures`
    (a count) when some sample left out a picture that cannot be opened; the trainer pops it and logs it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    keys: tuple[str, ...] = field(default=("pixel_values", "diffusion_pixel_values"))

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(sample["input_ids"]) for sample in samples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), self.label_pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(sample["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in self.keys:
            pictures = [sample[key] for sample in samples if sample.get(key) is not None and len(sample[key])]
            if pictures:
                batch[key] = torch.cat(pictures)
        skipped = sum(len(sample.get("skipped_pictures") or ()) for sample in samples)
        if skipped:  # only then: a batch is passed to the model as `model(**batch)`
            batch["skipped_pictures"] = torch.tensor(skipped)
        return batch


# --------------------------------------------------------------------------------------------------------------------
# Parquet shards
# --------------------------------------------------------------------------------------------------------------------


def write_parquet_shards(
    source: str | os.PathLike | DataSource,
    output_dir: str | os.PathLike,
    num_shards: int = 1,
    cache_dir: str | None = None,
) -> list[Path]:
    """
    Writes a source as self-contained Parquet shards (`train-00000-of-0000N.parquet`) with the pictures embedded:
    pairs keep their schema (`image`, `text`); documents get an `images` column aligned with `image_info`.
    `load_data_source(output_dir)` reads them back.
    """
    from datasets import Image as ImageFeature
    from datasets import Sequence as SequenceFeature
    from datasets.table import embed_table_storage

    if not isinstance(source, DataSource):
        source = load_data_source(source, cache_dir)
    dataset = source.dataset
    if source.kind == PAIRS:
        dataset = dataset.rename_columns(
            {old: new for old, new in ((source.image_column, "image"), (source.text_column, "text")) if old != new}
        ).select_columns(["image", "text"])
        dataset = dataset.cast_column("image", ImageFeature())
        if source.base_dir is not None:
            base_dir = source.base_dir

            def absolute(record):
                value = record["image"]
                if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
                    value = {"bytes": None, "path": str(Path(base_dir) / value["path"])}
                return {"image": value}

            dataset = dataset.cast_column("image", ImageFeature(decode=False)).map(absolute)
            dataset = dataset.cast_column("image", ImageFeature())
    else:
        base_dir = source.base_dir or "."

        def with_images(record):
            infos = record["image_info"] or []
            paths = [str(Path(base_dir) / info["image_name"]) for info in infos]
            return {"images": [{"bytes": None, "path": p} for p in paths]}

        if "images" not in dataset.column_names:
            dataset = dataset.map(with_images)
        dataset = dataset.cast_column("images", SequenceFeature(ImageFeature()))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_shards):
        shard = dataset.shard(num_shards, index, contiguous=True)
        shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        path = output / f"train-{index:05d}-of-{num_shards:05d}.parquet"
        shard.with_format(None).to_parquet(str(path))
        paths.append(path)
    return paths


__all__ = [
    "CONVERSATIONS",
    "DOCUMENTS",
    "IGNORE_INDEX",
    "PAIRS",
    "DataSource",
    "DiffusionImageTransform",
    "DreamLLMDataCollator",
    "DreamLLMDataset",
    "DreamLLMSampleBuilder",
    "build_training_dataset",
    "load_data_source",
    "load_image",
    "merge_text_list",
    "source_from_dataset",
    "write_parquet_shards",
]
