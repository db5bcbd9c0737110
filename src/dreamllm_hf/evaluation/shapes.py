"""The paper's evaluations in the shapes world: the same files the COCO and VQA commands read, and a small CLIP.

`write_shapes_benchmark(folder)` writes what `dreamllm-hf evaluate` needs to run offline against the shipped demo
model:

* `captions.jsonl`: captions to draw ("a red circle"), every colour and shape in turn, as `evaluate fid` reads them;
* `reference/`: pictures of the world drawn from a seed no training set uses (FID's reference set);
* `drawn/`: the world's own picture for every caption of `captions.jsonl`, with a `metadata.jsonl` (`file_name`,
  `caption`): what a perfect model would draw, to score with `evaluate fid --generated` as the floor of FID;
* `captioning.jsonl` + `pictures/`: held-out pictures with five reference captions each (`evaluate captions`);
* `vqa.jsonl`: two questions a picture ("What colour is the shape?", "What shape is it?") with ten annotators'
  answers, written the way people write them (case, a full stop, an article) and one stray answer (`evaluate vqa`);
* `clip/`: a small CLIP trained here on the world's pictures and captions (seconds on a CPU): the stand-in for CLIP
  ViT-L/14 in `--select-with` and for the feature network in `--feature-model`.
"""

import json
import random
from pathlib import Path

import PIL.ImageFilter
import torch
import torch.nn.functional as F

from ..shapes_world.evaluation import HELD_OUT_SEED
from ..shapes_world.world import COLOURS, IMAGE_SIZE, SHAPES, caption, draw_shape, sample_spec


CAPTION_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
WORLD_WORDS = ("a", "the", "one", "that", "is")  # the other words of the captions and references
REFERENCE_TEMPLATES = (
    "a {colour} {shape}",
    "A {colour} {shape}.",
    "the {colour} {shape}",
    "one {colour} {shape}",
    "a {shape} that is {colour}",
)
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"
# How annotators write a one-word answer; each of the ten answers takes one of these, and one answer strays.
ANSWER_SPELLINGS = ("{word}", "{word}", "{Word}", "{word}.", "the {word}")
ANSWERS_PER_QUESTION = 10

# Seeds of the benchmark's parts, offsets from the held-out seed of `evaluate-demo` (no training set uses them).
_REFERENCE_SEED = HELD_OUT_SEED + 101
_CAPTIONING_SEED = HELD_OUT_SEED + 202
_CLIP_DATA_SEED = HELD_OUT_SEED + 303
_DRAWN_SEED = HELD_OUT_SEED + 404


# --------------------------------------------------------------------------------------------------------------------
# A small CLIP of the world


def _shapes_tokenizer():
    """
    A CLIP tokenizer (CLIP's lower-casing byte-level BPE) whose merges spell each of the world's words as one token.

    The merges are written out rather than learnt: `tokenizers`' BPE trainer breaks ties between equally frequent pairs
    differently from run to run, and the CLIP trained on the ids would then differ too. Other text falls back to
    bytes.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    end_of_word = "</w>"
    characters = sorted(pre_tokenizers.ByteLevel.alphabet())
    # End of text at id 0, not 2: transformers' CLIP text model pools at the highest id when eos_token_id is 2
    # (the original CLIP's layout) and at the first end of text otherwise, which is right for any vocabulary.
    tokens = ["<|endoftext|>", "<|startoftext|>", *characters, *(c + end_of_word for c in characters)]
    merges = []
    for word in sorted({*WORLD_WORDS, *COLOURS, *SHAPES}):
        pieces = [*word[:-1], word[-1] + end_of_word]
        for piece in pieces[1:]:
            merges.append((pieces[0], piece))
            pieces[0] += piece
    merges = sorted(set(merges), key=lambda pair: (len(pair[0] + pair[1]), pair))  # short merges first
    tokens += [left + right for left, right in merges if left + right not in tokens]
    tokenizer = CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)
    for word in sorted({*WORLD_WORDS, *COLOURS, *SHAPES}):
        if tokenizer.tokenize(word) != [word + end_of_word]:
            raise RuntimeError(f"the shapes tokenizer splits {word!r}: {tokenizer.tokenize(word)}")
    return tokenizer


def _image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The pictures are IMAGE_SIZE² already: no resize or crop changes them.
    size = {"shortest_edge": IMAGE_SIZE}
    return CLIPImageProcessorPil(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _augmented_picture(rng: random.Random, colour: str, shape: str):
    picture = draw_shape(sample_spec(rng, colour=colour, shape=shape))
    radius = rng.choice((0.0, 0.0, 0.5, 1.0))  # generated pictures are softer than drawn ones
    return picture.filter(PIL.ImageFilter.GaussianBlur(radius)) if radius else picture


def train_shapes_clip(output_dir: str | Path, steps: int = 300, seed: int = 0, log=None) -> Path:
    """Trains a CLIP on the world's pictures and captions (every step: four sets of one picture per caption, each set
    its own contrastive batch) and saves model and processor to `output_dir`. Deterministic for a seed (one thread)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = _shapes_tokenizer()
    image_processor = _image_processor()
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    width = 64
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=4,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    model = CLIPModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = random.Random(_CLIP_DATA_SEED + seed)
    text = tokenizer([f"a {name}" for name in CAPTION_NAMES], padding=True, return_tensors="pt")
    # A pool of pictures per caption, processed once; every step takes one picture of each caption from it.
    pool_size = 32
    pool = image_processor(
        images=[_augmented_picture(rng, *name.split()) for _ in range(pool_size) for name in CAPTION_NAMES],
        return_tensors="pt",
    )["pixel_values"].view(pool_size, len(CAPTION_NAMES), 3, IMAGE_SIZE, IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    threads = torch.get_num_threads()
    # One thread: the steps are too small to share, and extra threads only wait on a busy machine (10x slower).
    torch.set_num_threads(1)
    try:
        _train_steps(model, optimizer, text, pool, generator, steps, groups=4, log=log)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _train_steps(model, optimizer, text, pool, generator, steps, groups, log) -> None:
    """Each step: `groups` sets of one picture per caption, each set a contrastive batch of its own (a picture of
    another set with the same caption is not a negative)."""
    pool_size, count = pool.shape[:2]
    labels = torch.arange(count)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, optimizer.param_groups[0]["lr"], total_steps=steps)
    for step in range(steps):
        rows = torch.randint(pool_size, (groups, count), generator=generator)
        pixel_values = pool[rows, labels.expand(groups, count)].flatten(0, 1)
        logits = model(**text, pixel_values=pixel_values).logits_per_image.view(groups, count, count)
        loss = (
            sum((F.cross_entropy(group, labels) + F.cross_entropy(group.T, labels)) / 2 for group in logits) / groups
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"shapes CLIP step {step + 1}/{steps}: loss {loss.item():.3f}")


# --------------------------------------------------------------------------------------------------------------------
# The benchmark files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _answers(rng: random.Random, word: str, stray: str) -> list[str]:
    answers = [
        rng.choice(ANSWER_SPELLINGS).format(word=word, Word=word.capitalize()) for _ in range(ANSWERS_PER_QUESTION - 1)
    ]
    answers.insert(rng.randrange(ANSWERS_PER_QUESTION), stray)
    return answers


def write_shapes_benchmark(
    output_dir: str | Path,
    num_captions: int = 96,
    num_reference: int = 480,
    num_pictures: int = 48,
    clip_steps: int = 300,
    seed: int = 0,
    log=None,
) -> dict:
    """Writes the files listed in the module docstring; returns their paths."""
    output = Path(output_dir)
    (output / "reference").mkdir(parents=True, exist_ok=True)
    (output / "pictures").mkdir(parents=True, exist_ok=True)

    names = [CAPTION_NAMES[i % len(CAPTION_NAMES)] for i in range(num_captions)]
    _write_jsonl(output / "captions.jsonl", [{"caption": f"a {name}", "image_id": i} for i, name in enumerate(names)])

    (output / "drawn").mkdir(exist_ok=True)
    rng = random.Random(_DRAWN_SEED + seed)
    for index, name in enumerate(names):
        colour, shape = name.split()
        draw_shape(sample_spec(rng, colour=colour, shape=shape)).save(output / "drawn" / f"drawn-{index:06d}.png")
    _write_jsonl(
        output / "drawn" / "metadata.jsonl",
        [{"file_name": f"drawn-{i:06d}.png", "caption": f"a {name}"} for i, name in enumerate(names)],
    )

    rng = random.Random(_REFERENCE_SEED + seed)
    for index in range(num_reference):
        draw_shape(sample_spec(rng)).save(output / "reference" / f"ref-{index:06d}.png")

    rng = random.Random(_CAPTIONING_SEED + seed)
    captioning, questions = [], []
    for index in range(num_pictures):
        spec = sample_spec(rng)
        name = f"pictures/shape-{index:06d}.png"
        draw_shape(spec).save(output / name)
        references = [template.format(colour=spec.colour, shape=spec.shape) for template in REFERENCE_TEMPLATES]
        assert references[0] == caption(spec)  # the world's own caption comes first
        captioning.append({"image": name, "references": references, "image_id": index})
        other_colour = rng.choice([colour for colour in COLOURS if colour != spec.colour])
        other_shape = rng.choice([shape for shape in SHAPES if shape != spec.shape])
        for number, (question, word, stray) in enumerate(
            ((COLOUR_QUESTION, spec.colour, other_colour), (SHAPE_QUESTION, spec.shape, other_shape))
        ):
            questions.append(
                {
                    "image": name,
                    "question": question,
                    "answers": _answers(rng, word, stray),
                    "question_id": 2 * index + number,
                    "image_id": index,
                }
            )
    _write_jsonl(output / "captioning.jsonl", captioning)
    _write_jsonl(output / "vqa.jsonl", questions)

    train_shapes_clip(output / "clip", steps=clip_steps, seed=seed, log=log)
    return {
        "captions": output / "captions.jsonl",
        "reference": output / "reference",
        "drawn": output / "drawn",
        "captioning": output / "captioning.jsonl",
        "vqa": output / "vqa.jsonl",
        "clip": output / "clip",
    }


__all__ = [
    "ANSWERS_PER_QUESTION",
    "CAPTION_NAMES",
    "COLOUR_QUESTION",
    "SHAPE_QUESTION",
    "train_shapes_clip",
    "write_shapes_benchmark",
]
