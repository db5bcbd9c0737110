"""Multi-turn conversations with pictures in and out: the previous turns rebuild the token stream the model wrote."""

import random

import numpy as np
import pytest
import torch
from test_pipeline import CollectStreamer, LogitsRecorder, written_stream

from dreamllm_hf import constants as C
from dreamllm_hf.modeling.conversation import render_conversation
from dreamllm_hf.pipelines import DreamLLMPipeline
from dreamllm_hf.shapes_world import COLOURS, SHAPES, draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_MODEL_PATH, DEMO_NUM_INFERENCE_STEPS
from dreamllm_hf.shapes_world.evaluation import named_colour_and_shape


STORY = dict(
    max_new_tokens=48, max_images=3, num_inference_steps=DEMO_NUM_INFERENCE_STEPS, guidance_scale=DEMO_GUIDANCE_SCALE
)


@pytest.fixture(scope="module")
def pipe():
    pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(colour="red", shape="circle", seed=0):
    return draw_shape(sample_spec(random.Random(seed), colour=colour, shape=shape))


# ---------------------------------------------------------------------------------------------------------------------
# Rendering, without a model


def test_pictures_are_read_in_user_turns_and_drawn_in_assistant_turns():
    red, blue, green = picture("red"), picture("blue"), picture("green")
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": red}, "What is in the picture?"]},
        {"role": "assistant", "content": ["a red circle", blue, "Then came more."]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": [{"type": "image"}]},
    ]
    messages, pictures = render_conversation(conversation, image=[green, red])
    assert [m["content"] for m in messages] == [
        "<image>What is in the picture?",
        "a red circle<dream>Then came more.",
        "<image>And this one?",
        "<dream>",
    ]
    assert pictures == [red, blue, green, red]  # reading order; `image` fills the open placeholders in order


def test_a_drawn_picture_given_as_an_array_is_read_as_its_8_bit_image():
    pil = picture("yellow", "square")
    as_array = np.asarray(pil).astype(np.float32) / 255
    _, pictures = render_conversation([{"role": "assistant", "content": [as_array]}])
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(pil))


@pytest.mark.parametrize(
    "conversation, images, message",
    [
        ([{"role": "robot", "content": "hi"}], None, "role 'robot'"),
        ([{"role": "user"}], None, "has no 'content'"),
        ([{"role": "user", "content": 3}], None, "content of type int"),
        ([{"role": "user", "content": [{"type": "video"}]}], None, "part of type 'video'"),
        ([{"role": "user", "content": [{"type": "text"}]}], None, "without a string 'text'"),
        ([{"role": "user", "content": [object()]}], None, "content item of type object"),
        ([{"role": "system", "content": [picture()]}], None, "system message with a picture"),
        ([{"role": "user", "content": "<image> and <image>"}], [picture()], "2 `<image>`/`<dream>` placeholders"),
        ([{"role": "user", "content": [picture()]}], [picture()], "has 1 pictures"),
    ],
)
def test_bad_conversations_say_what_to_change(conversation, images, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        render_conversation(conversation, images)


# ---------------------------------------------------------------------------------------------------------------------
# The demo model


@pytest.mark.parametrize("seed", [1, 5])
def test_a_document_given_back_as_an_assistant_turn_rebuilds_the_stream_the_model_wrote(pipe, seed):
    """The next call's prompt holds exactly the ids the model's context held, and the model computes the same logits
    there as when it wrote them: a conversation continued in a new call is the same as one long call."""
    tokens, logits = CollectStreamer(), LogitsRecorder()
    first = pipe(
        "Tell me a story.",
        do_sample=True,
        generator=torch.Generator().manual_seed(seed),
        streamer=tokens,
        generation_kwargs={"logits_processor": [logits]},
        **STORY,
    )
    document = first.documents[0]
    assert len(first.images[0]) >= 1 and first.stop_reasons[0] == "eos"
    stream, chosen_at = written_stream(pipe, tokens)

    conversation = [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": document},
        {"role": "user", "content": "Tell me a story."},
    ]
    text, pictures = pipe.chat_prompt_and_images(conversation)
    assert pictures == first.images[0]
    inputs = pipe.processor(text=[text], images=[pictures], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[: len(stream)] == stream  # ends with `</s>`, as the model wrote it
    assert pipe.tokenizer.decode(ids[len(stream) :]) == "USER: Tell me a story. ASSISTANT:"

    with torch.no_grad():
        rebuilt = pipe.mllm(**inputs).logits[0]
    assert len(logits.steps) == len(chosen_at)
    for position, recorded in zip(chosen_at, logits.steps):
        kept = torch.isfinite(recorded)  # the format's block tokens are suppressed (-inf) before our processor
        assert kept.sum() > pipe.mllm.config.text_config.vocab_size - 10
        torch.testing.assert_close(rebuilt[position][kept], recorded[kept], rtol=0, atol=1e-4)

    # And the conversation goes on: the second story is written after the first one, pictures and all.
    second = pipe(conversation, do_sample=True, generator=torch.Generator().manual_seed(seed), **STORY)
    assert second.text[0] and second.stop_reasons[0] in ("eos", "max_images")


def test_a_document_that_begins_with_a_picture_follows_the_colon_without_a_space(pipe):
    drawn = picture("green", "triangle")
    text, _ = pipe.chat_prompt_and_images(
        [{"role": "user", "content": "Draw."}, {"role": "assistant", "content": [drawn, "a green triangle"]}]
    )
    assert "ASSISTANT:<dream>a green triangle</s>" in text
    ids = pipe.processor(text=[text], images=[[drawn]])["input_ids"][0]
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    at = tokens.index(C.DREAM_START_TOKEN)
    assert tokens[at - 2 : at] == ["▁ASSISTANT", ":"]  # no stray "▁" piece that the model never wrote


def test_inline_pictures_give_the_answer_of_the_image_argument(pipe):
    shown = [
        picture(colour, shape, seed) for seed, (colour, shape) in enumerate([("blue", "triangle"), ("red", "square")])
    ]
    greedy = dict(allow_images=False, do_sample=False, max_new_tokens=8)
    inline = pipe(
        [
            [{"role": "user", "content": [{"type": "image", "image": image}, "What is in the picture?"]}]
            for image in shown
        ],
        **greedy,
    )
    separate = pipe(["<image>What is in the picture?"] * 2, image=[[image] for image in shown], **greedy)
    assert inline.text == separate.text
    # The model answers in a chat (stage III): right colours; shapes are its usual confusion (circle vs square).
    assert [named_colour_and_shape(text)[0] for text in inline.text] == ["blue", "red"]


def test_pictures_in_and_out_over_three_turns(pipe):
    """Ask about a picture, then for a story: the earlier turns (a picture in, the answer) stay in the context."""
    shown = picture("yellow", "circle", seed=3)
    first = pipe(
        [{"role": "user", "content": [shown, "What is in the picture?"]}],
        allow_images=False,
        do_sample=False,
        max_new_tokens=8,
    )
    assert first.text[0].strip() == "a yellow circle"
    conversation = [
        {"role": "user", "content": [shown, "What is in the picture?"]},
        {"role": "assistant", "content": first.documents[0]},
        {"role": "user", "content": "Tell me a story."},
    ]
    second = pipe(conversation, do_sample=True, generator=torch.Generator().manual_seed(5), **STORY)
    assert second.images[0], "the third turn drew no picture"
    named = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    assert any(name in second.text[0] for name in named)
    text, pictures = pipe.chat_prompt_and_images(
        conversation + [{"role": "assistant", "content": second.documents[0]}, {"role": "user", "content": "More."}]
    )
    assert pictures == [shown, *second.images[0]]
    assert text.count("<image>") == 1 and text.count("<dream>") == len(second.images[0])
