"""Continuous denoising (`DocumentWriter(denoising="continuous")`, what the server runs): pictures join a running
`PictureBatch`, documents wait for their pictures out of the text steps, and every document is still the one written
alone (the pipeline, whose pictures are text-to-image calls)."""

import numpy as np
import pytest
from test_document_batch import (
    IMAGES,
    PROMPTS,
    SmallVocabulary,
    assert_same_document,
    request,
    script_plans,
    scripted,
    written,
)
from test_pipeline import FAST, load_pipeline, picture, seeded
from transformers import LogitsProcessorList

from dreamllm_hf.pipelines import DocumentWriter, DreamLLMText2ImagePipeline, StopReason
from dreamllm_hf.pipelines.picture_batch import PictureBatch, PictureRequest


@pytest.fixture(scope="module")
def pipe(converted_tiny):
    return load_pipeline(converted_tiny)


@pytest.fixture(scope="module")
def scripts(pipe):
    return script_plans(pipe)


def alone(pipe, index, seed, **kwargs):
    return pipe(PROMPTS[index], image=IMAGES[index] or None, generator=[seeded(seed)], **kwargs)


def unet_batches(pipe):
    """The batch size of every UNet call, while the context is open."""
    sizes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes, hook


def test_a_picture_batch_draws_what_text_to_image_draws_alone_whatever_else_it_holds(pipe):
    text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)
    size = text2image.unet.config.sample_size * text2image.vae_scale_factor
    captions = ["a red circle", "a blue square", "two green triangles"]
    settings = [
        dict(num_inference_steps=5, guidance_scale=3.5),
        dict(num_inference_steps=3, guidance_scale=2.0, guidance_rescale=0.7),
        dict(num_inference_steps=4, guidance_scale=1.0),  # no guidance: one UNet row
    ]
    expected, requests = [], []
    for seed, (caption, setting) in enumerate(zip(captions, settings)):
        embeds, negative, _, _ = text2image.encode_prompt(caption, "cpu", 1, setting["guidance_scale"] > 1)
        drawn = text2image(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            generator=seeded(seed),
            output_type="np",
            **setting,
        )
        expected.append(drawn.images[0])
        requests.append(PictureRequest(embeds, negative, height=size, width=size, generator=seeded(seed), **setting))
    batch, finished = PictureBatch(pipe), {}
    sizes, hook = unet_batches(pipe)
    try:
        for step in range(8):  # picture 0 from the start, 1 joins at step 1 and 2 at step 2
            if step < 3:
                batch.add(step, requests[step])
            finished.update({key: (array, steps) for key, array, steps in batch.step()})
    finally:
        hook.remove()
    assert len(batch) == 0 and sorted(finished) == [0, 1, 2]
    unguided = requests[0]
    with pytest.raises(ValueError, match="negative_prompt_embeds"):  # guided, but no unconditional rows
        batch.add("bad", PictureRequest(unguided.prompt_embeds, None, height=size, width=size, guidance_scale=3.5))
    assert [finished[i][1] for i in range(3)] == [5, 3, 4]
    assert sizes[:3] == [2, 4, 5]  # the pictures shared UNet calls, each at its own timestep
    for key, picture_expected in enumerate(expected):
        np.testing.assert_allclose(finished[key][0], picture_expected, atol=1e-5)


@pytest.mark.parametrize("sampled", [False, True])
def test_documents_admitted_mid_flight_equal_each_alone_with_continuous_denoising(pipe, scripts, sampled):
    plans, free = scripts
    if sampled:
        options = dict(
            do_sample=True,
            max_images=2,
            generation_kwargs={"logits_processor": LogitsProcessorList([SmallVocabulary(free)])},
        )
    else:
        options = dict(generation_kwargs=scripted(plans))
    kwargs = dict(max_new_tokens=10, output_type="np", **options, **FAST)
    writer = DocumentWriter(pipe, denoising="continuous")
    after = {
        0: [(0, request(PROMPTS[0], IMAGES[0], 30, **kwargs)), (2, request(PROMPTS[2], IMAGES[2], 32, **kwargs))],
        2: [(1, request(PROMPTS[1], IMAGES[1], 31, **kwargs))],  # while document 0 waits for its picture
        4: [(3, request(PROMPTS[3], IMAGES[3], 33, **kwargs))],
    }
    outputs, _ = written(writer, {}, after)
    assert len(outputs) == 4 and not writer.has_work
    if not sampled:
        assert [len(outputs[i].images[0]) for i in range(4)] == [1, 2, 0, 0]
    else:
        assert sum(len(outputs[i].images[0]) for i in range(4)) > 0
    for index in range(4):
        assert_same_document(outputs[index], 0, alone(pipe, index, 30 + index, **kwargs))
    assert writer.batch.cache_rows == 0 and len(writer._pictures) == 0


def test_the_others_write_on_while_a_picture_is_drawn_and_pictures_of_different_steps_share_unet_calls(pipe, scripts):
    plans, _ = scripts
    steps = 4
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np")
    kwargs.update(num_inference_steps=steps, guidance_scale=3.5)
    writer = DocumentWriter(pipe, denoising="continuous")
    # Two documents that draw and three text-only ones: more write than wait, so the text goes on beside the pictures.
    order = (0, 1, 2, 2, 2)
    ids = {writer.submit(request(PROMPTS[i], IMAGES[i], seed, **kwargs)): (i, seed) for seed, i in enumerate(order)}
    sizes, hook = unet_batches(pipe)
    events = []
    try:
        while writer.has_work:
            events.extend(writer.step())
    finally:
        hook.remove()
    first = next(d for d, (i, _) in ids.items() if i == 0)
    texts = {d for d, (i, _) in ids.items() if i == 2}
    started = next(k for k, e in enumerate(events) if e.type == "picture_start" and e.document == first)
    drawn = next(k for k, e in enumerate(events) if e.type == "picture" and e.document == first)
    between = [e for e in events[started:drawn] if e.type == "text" and e.document in texts]
    assert between, "the text-only documents wrote nothing while document 0's picture was drawn"
    # Three pictures (document 0 asks at its 3rd step, document 1 at its 2nd and 3rd): drawn one after the other
    # they take 3 * steps UNet calls; sharing calls, fewer, some of them holding two pictures (4 rows).
    assert len(sizes) < 3 * steps and max(sizes) == 4
    outputs = {ids[e.document]: e.output for e in events if e.type == "document_end"}
    for (index, seed), output in outputs.items():
        assert_same_document(output, 0, alone(pipe, index, seed, **kwargs))


def test_while_pictures_are_drawn_text_waits_when_as_many_wait_as_write(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    kwargs["num_inference_steps"] = 5
    writer = DocumentWriter(pipe, denoising="continuous")
    drawing = writer.submit(request(PROMPTS[0], IMAGES[0], 0, **kwargs))
    text = writer.submit(request(PROMPTS[2], IMAGES[2], 2, **kwargs))
    steps = []
    while writer.has_work:
        steps.append(writer.step())
    started = next(k for k, events in enumerate(steps) if any(e.type == "picture_start" for e in events))
    drawn = next(k for k, events in enumerate(steps) if any(e.type == "picture" for e in events))
    assert drawn - started == 4  # the picture's other 4 denoising steps, one per writer step
    # One writes and one waits: the text-only document keeps in step with the drawing one instead of writing alone.
    assert not any(e.document == text for events in steps[started + 1 : drawn] for e in events)
    ends = {e.document: e.output for events in steps for e in events if e.type == "document_end"}
    assert_same_document(ends[drawing], 0, alone(pipe, 0, 0, **kwargs))
    assert_same_document(ends[text], 0, alone(pipe, 2, 2, **kwargs))


def test_a_document_cancelled_while_it_waits_drops_its_picture_and_frees_its_row(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    kwargs["num_inference_steps"] = 6
    writer = DocumentWriter(pipe, denoising="continuous")
    waiting = writer.submit(request(PROMPTS[0], IMAGES[0], 0, **kwargs))
    other = writer.submit(request(PROMPTS[2], IMAGES[2], 2, **kwargs))
    events = []
    while waiting not in writer.batch.waiting_documents:
        events.extend(writer.step())
    assert writer._pictures.keys == [waiting]
    writer.cancel(waiting)
    events.extend(writer.step())
    end = next(e for e in events if e.type == "document_end")
    assert end.document == waiting and end.stop_reason == StopReason.CANCELLED
    assert len(writer._pictures) == 0 and writer.batch.waiting_documents == []
    assert writer.batch.cache_rows == 1
    while writer.has_work:
        events.extend(writer.step())
    assert not any(e.type == "picture" and e.document == waiting for e in events)
    output = next(e.output for e in events if e.type == "document_end" and e.document == other)
    assert_same_document(output, 0, alone(pipe, 2, 2, **kwargs))
    assert writer.batch.cache_rows == 0


def test_read_pictures_takes_only_documents_that_wait(pipe, scripts):
    plans, _ = scripts
    writer = DocumentWriter(pipe, denoising="continuous")
    writer.submit(request(PROMPTS[2], IMAGES[2], 2, generation_kwargs=scripted(plans), max_new_tokens=4, **FAST))
    writer.step()
    with pytest.raises(ValueError, match=r"documents waiting for one \(\[\]\).*\[7\] are not waiting"):
        writer.batch.read_pictures([7], [picture(1)])


def test_a_continuous_writer_refuses_a_step_callback_and_names_the_other_mode(pipe):
    writer = DocumentWriter(pipe, denoising="continuous")
    bad = request(PROMPTS[0], IMAGES[0], 0, callback_on_step_end=lambda *args: {}, **FAST)
    with pytest.raises(ValueError, match="denoising='together'"):
        writer.submit(bad)
    with pytest.raises(ValueError, match="Unknown denoising 'later'"):
        DocumentWriter(pipe, denoising="later")
    with pytest.raises(ValueError, match="needs the dynamic cache"):
        DocumentWriter(pipe, cache_implementation="static", denoising="continuous")
