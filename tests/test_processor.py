"""The legacy fast tokenizer and DreamLLMProcessor against the original code's goldens (fixtures README §0 and §2)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dreamllm_hf import DreamLLMProcessor
from dreamllm_hf import constants as C
from dreamllm_hf.conversion.tokenizer import build_legacy_tokenizer


GOLDEN_CHAT = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "The picture shows a cat."},
]


# ---------------------------------------------------------------- fixtures and reference helpers


@pytest.fixture(scope="module")
def added_tokens(original_tiny_dir) -> dict[str, int]:
    return json.loads((original_tiny_dir / "added_tokens.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(original_tiny_dir, added_tokens):
    max_length = json.loads((original_tiny_dir / "tokenizer_config.json").read_text())["model_max_length"]
    return build_legacy_tokenizer(original_tiny_dir / "tokenizer.model", added_tokens, model_max_length=max_length)


@pytest.fixture(scope="module")
def image_processor(original_tiny_dir):
    # The PIL backend explicitly: it is what the original used (the torchvision backend resizes differently).
    return CLIPImageProcessorPil.from_pretrained(original_tiny_dir / "components" / "clip_vision")


@pytest.fixture(scope="module")
def processor(image_processor, tokenizer, goldens_json):
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=goldens_json["num_image_tokens"],
        num_dream_queries=goldens_json["num_dream_queries"],
    )


@pytest.fixture(scope="module")
def raw_images(goldens) -> list[Image.Image]:
    names = sorted(name for name in goldens if name.startswith("raw_image_"))
    return [Image.fromarray(goldens[name].numpy().astype(np.uint8)) for name in names]


def golden_id(goldens_json, token: str) -> int:
    return goldens_json["ids"][token]


def image_block(goldens_json, num_image_tokens: int) -> list[int]:
    ids = goldens_json["ids"]
    return [ids[C.IMAGE_START_TOKEN], *[ids[C.IMAGE_PATCH_TOKEN]] * num_image_tokens, ids[C.IMAGE_END_TOKEN]]


def dream_block(goldens_json, num_dream_queries: int) -> list[int]:
    ids = goldens_json["ids"]
    return [ids[C.DREAM_START_TOKEN], *[ids[C.IMAGE_PATCH_TOKEN]] * num_dream_queries, ids[C.DREAM_END_TOKEN]]


def expand_reference(ids: list[int], goldens_json, num_image_tokens: int, num_dream_queries: int) -> list[int]:
    """The original's `truncate_and_replace`: `<image>` -> image ids, `<dream>` -> dream ids + image ids."""
    image = image_block(goldens_json, num_image_tokens)
    dream = dream_block(goldens_json, num_dream_queries) + image
    replacement = {
        golden_id(goldens_json, C.IMAGE_PLACEHOLDER): image,
        golden_id(goldens_json, C.DREAM_PLACEHOLDER): dream,
    }
    return [expanded for token_id in ids for expanded in replacement.get(token_id, [token_id])]


def count_placeholders(ids: list[int], goldens_json) -> int:
    placeholders = {golden_id(goldens_json, C.IMAGE_PLACEHOLDER), golden_id(goldens_json, C.DREAM_PLACEHOLDER)}
    return sum(token_id in placeholders for token_id in ids)


def assert_matches_golden_tokenization(tok, goldens_json):
    for case in goldens_json["tokenization"]:
        ids = tok(case["text"])["input_ids"]
        assert ids == case["input_ids"], f"ids differ for {case['text']!r}"
        assert tok.convert_ids_to_tokens(ids) == case["tokens"], f"tokens differ for {case['text']!r}"


# ---------------------------------------------------------------- the legacy fast tokenizer


def test_builder_reproduces_golden_tokenization(tokenizer, goldens_json):
    assert_matches_golden_tokenization(tokenizer, goldens_json)


def test_builder_vocabulary_and_special_ids(tokenizer, goldens_json, added_tokens):
    assert len(tokenizer) == goldens_json["tokenizer_len"]
    assert tokenizer.convert_tokens_to_ids(list(added_tokens)) == list(added_tokens.values())
    assert tokenizer.bos_token_id == goldens_json["ids"]["bos"]
    assert tokenizer.eos_token_id == goldens_json["ids"]["eos"]
    assert tokenizer.pad_token_id == goldens_json["ids"]["pad"]
    assert tokenizer.padding_side == "left"
    # BOS is added, EOS is not.
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id


def test_saved_tokenizer_reloads_with_the_same_ids(tokenizer, tmp_path, goldens_json):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    assert type(reloaded).__name__ == "TokenizersBackend"
    assert len(reloaded) == goldens_json["tokenizer_len"]
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert reloaded.padding_side == "left"
    assert_matches_golden_tokenization(reloaded, goldens_json)


def test_builder_rejects_added_tokens_that_do_not_fit_the_model(original_tiny_dir, added_tokens):
    model = original_tiny_dir / "tokenizer.model"
    shifted = {token: token_id + 1 for token, token_id in added_tokens.items()}
    with pytest.raises(ValueError, match="ids"):
        build_legacy_tokenizer(model, shifted)
    without_dream = {token: token_id for token, token_id in added_tokens.items() if token != C.DREAM_PLACEHOLDER}
    with pytest.raises(ValueError, match=C.DREAM_PLACEHOLDER):
        build_legacy_tokenizer(model, without_dream)


# ---------------------------------------------------------------- text through the processor


def test_processor_reproduces_golden_tokenization_with_expanded_placeholders(processor, goldens_json, raw_images):
    for case in goldens_json["tokenization"]:
        num_images = count_placeholders(case["input_ids"], goldens_json)
        images = [raw_images[i % len(raw_images)] for i in range(num_images)] or None
        out = processor(text=case["text"], images=images)
        expected = expand_reference(
            case["input_ids"], goldens_json, goldens_json["num_image_tokens"], goldens_json["num_dream_queries"]
        )
        assert out["input_ids"] == [expected], f"ids differ for {case['text']!r}"
        assert out["attention_mask"] == [[1] * len(expected)]

    creation = goldens_json["creation"]
    out = processor(text=[creation["prompt"], creation["negative_prompt"]], padding=False)
    assert out["input_ids"] == [creation["prompt_input_ids"], creation["negative_input_ids"]]


@pytest.mark.parametrize("num_image_tokens, num_dream_queries", [(6, 3), (3, 6)])
def test_placeholders_expand_into_blocks(
    image_processor, tokenizer, goldens_json, raw_images, num_image_tokens, num_dream_queries
):
    processor = DreamLLMProcessor(
        image_processor, tokenizer, num_image_tokens=num_image_tokens, num_dream_queries=num_dream_queries
    )
    bos = golden_id(goldens_json, "bos")
    image = image_block(goldens_json, num_image_tokens)
    dream = dream_block(goldens_json, num_dream_queries)

    assert processor(text=C.IMAGE_PLACEHOLDER, images=raw_images[0])["input_ids"] == [[bos, *image]]
    assert processor(text=C.DREAM_PLACEHOLDER, images=raw_images[0])["input_ids"] == [[bos, *dream, *image]]
    assert len(image) == num_image_tokens + 2 and len(dream) == num_dream_queries + 2
    assert (processor.image_block_ids, processor.dream_block_ids) == (image, dream)
    assert processor.drawn_picture_ids == [*dream, *image]  # what the pipeline writes for a picture it draws


def test_expansion_reproduces_the_original_training_layout(processor, goldens_json):
    """Collapsing the golden training samples' blocks back to placeholders and expanding again gives them back."""
    ids = goldens_json["ids"]
    image_length = goldens_json["num_image_tokens"] + 2
    dream_length = goldens_json["num_dream_queries"] + 2 + image_length
    for name in ("train_interleaved_1img", "train_interleaved_2img", "train_i2t_pair"):
        golden = goldens_json["training"]["samples"][name]["input_ids"][0]
        collapsed, position = [], 0
        while position < len(golden):
            if golden[position] == ids[C.DREAM_START_TOKEN]:
                collapsed.append(ids[C.DREAM_PLACEHOLDER])
                position += dream_length
            elif golden[position] == ids[C.IMAGE_START_TOKEN]:
                collapsed.append(ids[C.IMAGE_PLACEHOLDER])
                position += image_length
            else:
                collapsed.append(golden[position])
                position += 1
        assert count_placeholders(collapsed, goldens_json) > 0
        assert processor.expand_placeholders(collapsed) == golden, name


def test_batch_is_padded_on_the_left_after_expansion(processor, goldens_json, raw_images):
    prompts = ["short", f"{C.IMAGE_PLACEHOLDER} a longer prompt with a picture"]
    singles = [
        processor(text=prompts[0])["input_ids"][0],
        processor(text=prompts[1], images=raw_images[0])["input_ids"][0],
    ]
    pad = golden_id(goldens_json, "pad")
    width = max(map(len, singles))
    assert len(singles[0]) < width

    batch = processor(text=prompts, images=[raw_images[0]], return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    n_pad = width - len(singles[0])
    assert batch["input_ids"][0].tolist() == [pad] * n_pad + singles[0]
    assert batch["attention_mask"][0].tolist() == [0] * n_pad + [1] * len(singles[0])
    assert batch["input_ids"][1].tolist() == singles[1]
    assert batch["attention_mask"][1].tolist() == [1] * width

    right = processor(text=prompts, images=[raw_images[0]], return_tensors="pt", padding_side="right")
    assert right["input_ids"][0].tolist() == singles[0] + [pad] * n_pad
    assert right["attention_mask"][0].tolist() == [1] * len(singles[0]) + [0] * n_pad


# ---------------------------------------------------------------- images


def test_image_processor_reproduces_golden_pixel_values(image_processor, raw_images, goldens):
    pixel_values = image_processor(raw_images, return_tensors="pt")["pixel_values"]
    # Measured max abs diff 0.0 (Pillow 13.0.0, the generator's version): hold it exactly.
    torch.testing.assert_close(pixel_values, goldens["pixel_values"], atol=0.0, rtol=0.0)


@pytest.mark.parametrize("image_kind", ["pil", "numpy", "torch", "numpy_stack"])
def test_processor_pixel_values_for_each_image_type(processor, raw_images, goldens, image_kind):
    arrays = [np.array(image) for image in raw_images]
    images = {
        "pil": raw_images,
        "numpy": arrays,
        "torch": [torch.from_numpy(array) for array in arrays],
        "numpy_stack": np.stack([array[:31, :36] for array in arrays]),  # one 4-D array = several pictures
    }[image_kind]
    text = f"{C.IMAGE_PLACEHOLDER} and {C.IMAGE_PLACEHOLDER}"
    pixel_values = processor(text=text, images=images, return_tensors="pt")["pixel_values"]
    if image_kind == "numpy_stack":
        crops = [Image.fromarray(array[:31, :36]) for array in arrays]
        expected = processor.image_processor(crops, return_tensors="pt")
        torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=0.0, rtol=0.0)
    else:
        torch.testing.assert_close(pixel_values, goldens["pixel_values"], atol=0.0, rtol=0.0)


def test_images_follow_reading_order_over_the_batch(processor, raw_images, goldens):
    # Prompt 0 takes the first picture; in prompt 1, <dream> takes the second (its target, re-read by CLIP).
    text = [f"{C.IMAGE_PLACEHOLDER} first", f"then {C.DREAM_PLACEHOLDER}"]
    reversed_pictures = goldens["pixel_values"].flip(0)
    flat = processor(text=text, images=raw_images[::-1], return_tensors="pt")
    per_prompt = processor(text=text, images=[[raw_images[1]], [raw_images[0]]], return_tensors="pt")
    torch.testing.assert_close(flat["pixel_values"], reversed_pictures, atol=0.0, rtol=0.0)
    torch.testing.assert_close(per_prompt["pixel_values"], reversed_pictures, atol=0.0, rtol=0.0)
    assert torch.equal(flat["input_ids"], per_prompt["input_ids"])


def test_images_without_text_give_only_pixel_values(processor, raw_images, goldens):
    out = processor(images=raw_images, return_tensors="pt")
    assert set(out) == {"pixel_values"}
    torch.testing.assert_close(out["pixel_values"], goldens["pixel_values"], atol=0.0, rtol=0.0)


@pytest.mark.parametrize(
    "text, image_count, counts",
    [
        (f"{C.IMAGE_PLACEHOLDER} {C.DREAM_PLACEHOLDER}", 1, ("2", "1")),
        (f"{C.IMAGE_PLACEHOLDER} no picture given", 0, ("1", "0")),
        ("no placeholder", 1, ("0", "1")),
    ],
)
def test_image_count_mismatch_is_an_error(processor, raw_images, text, image_count, counts):
    images = [raw_images[0]] * image_count or None
    with pytest.raises(ValueError, match=rf"{counts[0]} .*placeholders but {counts[1]} pictures"):
        processor(text=text, images=images)


def test_per_prompt_image_count_mismatch_is_an_error(processor, raw_images):
    text = [f"{C.IMAGE_PLACEHOLDER} one", "none"]
    with pytest.raises(ValueError, match="Prompt 0 has 1 .* but 0 pictures"):
        processor(text=text, images=[[], [raw_images[0]]])
    with pytest.raises(ValueError, match="1 per-prompt lists but there are 2 prompts"):
        processor(text=text, images=[[raw_images[0]]])


@pytest.mark.parametrize("bad_images", [42, [{"image": None}], [np.zeros((1, 1, 4, 4, 3))], [[1.5]]])
def test_unsupported_image_types_are_an_error(processor, bad_images):
    with pytest.raises(ValueError, match="Unsupported image type"):
        processor(text=C.IMAGE_PLACEHOLDER, images=bad_images)


def test_bad_text_and_truncation_are_errors(processor):
    with pytest.raises(ValueError, match="string"):
        processor(text=3)
    with pytest.raises(ValueError, match="Truncation"):
        processor(text="hello", truncation=True, max_length=2)
    with pytest.raises(ValueError):
        processor()


# ---------------------------------------------------------------- chat template, decoding, serialization


def test_chat_template_reproduces_the_golden_training_prompt(processor, goldens_json, raw_images):
    golden = goldens_json["tokenization"][0]
    assert processor.chat_template == C.VICUNA_CHAT_TEMPLATE
    assert processor.apply_chat_template(GOLDEN_CHAT) == golden["text"]

    structured = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in the picture?"}]},
        GOLDEN_CHAT[1],
    ]
    assert processor.apply_chat_template(structured) == golden["text"]

    prompt = processor.apply_chat_template(GOLDEN_CHAT[:1], add_generation_prompt=True)
    assert prompt == golden["text"].split(" ASSISTANT:")[0] + " ASSISTANT:"

    content = [{"type": "image", "image": raw_images[0]}, {"type": "text", "text": "Hi"}]
    with_image = [{"role": "user", "content": content}]
    tokenized = processor.apply_chat_template(with_image, tokenize=True, return_dict=True, return_tensors="pt")
    assert tokenized["pixel_values"].shape[0] == 1
    assert tokenized["input_ids"][0].tolist().count(golden_id(goldens_json, C.IMAGE_START_TOKEN)) == 1


def test_decode_forwards_to_the_tokenizer(processor, goldens_json):
    creation = goldens_json["creation"]
    assert processor.decode(creation["prompt_input_ids"], skip_special_tokens=True) == creation["prompt"]
    assert processor.batch_decode([creation["prompt_input_ids"]], skip_special_tokens=True) == [creation["prompt"]]


def test_processor_round_trips_through_auto_processor(processor, raw_images, tmp_path):
    custom_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    custom = DreamLLMProcessor(
        processor.image_processor,
        processor.tokenizer,
        num_image_tokens=5,
        num_dream_queries=3,
        chat_template=custom_template,
    )
    text = [f"a {C.IMAGE_PLACEHOLDER} b", f"c {C.DREAM_PLACEHOLDER}"]
    for original, folder in ((processor, tmp_path / "default"), (custom, tmp_path / "custom")):
        original.save_pretrained(folder)
        reloaded = AutoProcessor.from_pretrained(folder)

        assert isinstance(reloaded, DreamLLMProcessor)
        assert reloaded.num_image_tokens == original.num_image_tokens
        assert reloaded.num_dream_queries == original.num_dream_queries
        assert reloaded.chat_template == original.chat_template
        before = original(text=text, images=raw_images, return_tensors="pt")
        after = reloaded(text=text, images=raw_images, return_tensors="pt")
        assert torch.equal(before["input_ids"], after["input_ids"])
        assert torch.equal(before["attention_mask"], after["attention_mask"])
        assert reloaded.image_processor.to_dict() | {"image_processor_type": None} == (
            original.image_processor.to_dict() | {"image_processor_type": None}
        )
        # AutoImageProcessor picks the torchvision backend when it is installed, which resizes differently.
        if type(reloaded.image_processor) is type(original.image_processor):
            torch.testing.assert_close(before["pixel_values"], after["pixel_values"], atol=0.0, rtol=0.0)


def test_check_model_config_refuses_a_model_that_reads_pictures_otherwise():
    from dreamllm_hf.testing_utils import tiny_config, tiny_processor

    processor = tiny_processor()
    processor.check_model_config(tiny_config())  # the same layout: nothing to say
    with pytest.raises(ValueError, match="4 image slots and a dream into 3 query slots.*reads 16 and 3"):
        processor.check_model_config(tiny_config(vision_config={"image_size": 56}))
    dream_start = processor.special_token_ids[C.DREAM_START_TOKEN]
    with pytest.raises(ValueError, match=rf"special token ids differ.*'<dream_start>': \({dream_start}, 7\)"):
        processor.check_model_config(tiny_config(dream_start_token_id=7))
