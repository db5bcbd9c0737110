"""The document engine: many documents written together equal each written alone; events; static and dynamic caches.

The tiny converted checkpoint has random weights, so what the documents say is steered by logits processors that decide
from each row's own tokens only (never from the batch), as any per-row processor of `generate` does.
"""

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline import FAST, CollectStreamer, load_pipeline, picture, seeded
from transformers import LogitsProcessor, LogitsProcessorList

from dreamllm_hf.pipelines import DocumentEvent, DocumentRequest, DocumentWriter, DreamLLMPipeline, StopReason


EOS, DREAM_END, DREAM_START = 2, 1002, 1003

PROMPTS = [
    "Tell a story",
    "Describe <image> in a few words please",
    "Write about the sea and the wind and the long road home",
    "Hi",
]
IMAGES = [[], [picture(7)], [], []]


@pytest.fixture(scope="module")
def pipe(converted_tiny) -> DreamLLMPipeline:
    return load_pipeline(converted_tiny)


def prompt_tokens(pipe, prompt, images):
    chat = pipe.format_chat_prompt(prompt)
    return set(pipe.processor(text=chat, images=images or None)["input_ids"][0])


class Scripts(LogitsProcessor):
    """Row by row: the script of the prompt whose tag token the row holds, at the step given by the script tokens and
    pictures (`<dream_end>`) already in the row; the last entry repeats."""

    def __init__(self, scripts: dict[int, list[int]]):
        self.scripts = scripts
        self.vocabulary = torch.tensor(sorted({t for s in scripts.values() for t in s if t not in (EOS, DREAM_START)}))

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(input_ids):
            tag = next(t for t in self.scripts if (ids == t).any())
            step = int(torch.isin(ids, self.vocabulary).sum() + (ids == DREAM_END).sum())
            script = self.scripts[tag]
            forced[row, script[min(step, len(script) - 1)]] = 0
        return forced


class SmallVocabulary(LogitsProcessor):
    """Sampling among a few text tokens, `<dream_start>` and `</s>` (stateless), so that sampled documents draw."""

    def __init__(self, tokens):
        self.allowed = torch.tensor(list(tokens) + [DREAM_START, EOS])

    def __call__(self, input_ids, scores):
        kept = torch.full_like(scores, -float("inf"))
        kept[:, self.allowed] = scores[:, self.allowed]
        return kept


@pytest.fixture(scope="module")
def scripts(pipe):
    return script_plans(pipe)


def script_plans(pipe):
    """Per prompt a tag (a token only its prompt holds) and a script: text and pictures in different places."""
    tokens = [prompt_tokens(pipe, p, i) for p, i in zip(PROMPTS, IMAGES)]
    every = set().union(*tokens)
    free = [t for t in range(10, 999) if t not in every]
    tags = [next(iter(sorted(t - set().union(*(o for o in tokens if o is not t))))) for t in tokens]
    a, b, c, d, e = free[:5]
    plans = [
        [a, b, DREAM_START, c, EOS],  # text, picture, text
        [a, DREAM_START, DREAM_START, b, c, d, EOS],  # two pictures in a row
        [b, c, d, e, a, b, c, d, e, EOS],  # text only, longer
        [EOS],  # nothing at all
    ]
    return dict(zip(tags, plans)), free[:5]


def scripted(scripts):
    return {"logits_processor": LogitsProcessorList([Scripts(scripts)])}


def assert_same_document(batch, index, single):
    """Identical text and stop reason; pictures within fp32 rounding (1e-5 on [0, 1] pixels).

    A picture is read back as the 8-bit image it is saved as. When rounding puts an earlier picture's pixel on the other
    side of an 8-bit step (a float difference of ~1e-6), CLIP reads one pixel differently, and the later pictures of
    that document then differ a little more: that case is checked as such (one level, few pixels; 1e-4 after)."""
    assert batch.text[index] == single.text[0]
    assert batch.stop_reasons[index] == single.stop_reasons[0]
    assert len(batch.documents[index]) == len(single.documents[0])
    read_back_differs = False
    for ours, alone in zip(batch.documents[index], single.documents[0]):
        if isinstance(alone, str):
            assert ours == alone
            continue
        np.testing.assert_allclose(ours, alone, atol=1e-4 if read_back_differs else 1e-5)
        levels = np.abs((ours * 255).round() - (alone * 255).round())
        assert levels.max() <= 1 and (levels > 0).mean() < 0.01
        read_back_differs = read_back_differs or bool(levels.any())


def test_batch_equals_single_greedy_with_mixed_documents(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), output_type="np", max_new_tokens=12, **FAST)
    batch = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    assert [len(images) for images in batch.images] == [1, 2, 0, 0]
    assert batch.stop_reasons == [StopReason.EOS] * 4
    assert batch.documents[3] == []
    for index, prompt in enumerate(PROMPTS):
        single = pipe(prompt, image=IMAGES[index] or None, generator=[seeded(index)], **kwargs)
        assert_same_document(batch, index, single)
    # The pictures follow their own generators: a different seed for one document changes only that document.
    other = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in (0, 9, 2, 3)], **kwargs)
    np.testing.assert_array_equal(other.images[0][0], batch.images[0][0])
    assert not np.allclose(other.images[1][0], batch.images[1][0])


def test_batch_equals_single_sampled_with_one_generator_per_document(pipe, scripts):
    _, free = scripts
    kwargs = dict(
        generation_kwargs={"logits_processor": LogitsProcessorList([SmallVocabulary(free)])},
        do_sample=True,
        max_new_tokens=10,
        max_images=2,
        output_type="np",
        **FAST,
    )
    prompts = PROMPTS * 2
    generators = [seeded(100 + i) for i in range(8)]
    batch = pipe(prompts, image=IMAGES * 2, generator=generators, **kwargs)
    pictures = [len(images) for images in batch.images]
    assert max(pictures) > 0 and min(pictures) == 0  # a mix: the sampling decides, per document
    assert len({len(t) for t in batch.text}) > 1
    for index, prompt in enumerate(prompts):
        single = pipe(prompt, image=(IMAGES * 2)[index] or None, generator=[seeded(100 + index)], **kwargs)
        assert_same_document(batch, index, single)
    # Text sampling draws from the document's generator, not the global RNG.
    torch.manual_seed(12345)
    again = pipe(prompts[:2], image=IMAGES[:2], generator=[seeded(100), seeded(101)], **kwargs)
    assert again.text == batch.text[:2]


def test_stream_events_tell_the_output(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, **FAST)
    events = list(pipe.stream(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs))
    assert all(isinstance(e, DocumentEvent) for e in events)
    assert events[-1].type == "end" and [e.type for e in events].count("end") == 1
    output = events[-1].output
    called = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    assert output.text == called.text and output.stop_reasons == called.stop_reasons
    for document in range(len(PROMPTS)):
        mine = [e for e in events if e.document == document]
        assert "".join(e.text for e in mine if e.type == "text") == output.text[document]
        starts = [e.index for e in mine if e.type == "picture_start"]
        drawn = [e for e in mine if e.type == "picture"]
        assert starts == [e.index for e in drawn] == list(range(len(output.images[document])))
        for event in drawn:
            assert event.image is output.images[document][event.index]
            assert [e.type for e in mine].index("picture_start") < [e.type for e in mine].index("picture")
        ends = [e for e in mine if e.type == "document_end"]
        assert len(ends) == 1 and mine[-1] is ends[0]
        assert ends[0].stop_reason == output.stop_reasons[document]
        assert ends[0].output.text == [output.text[document]]
    # Documents are streamed as they are written: the text-only document ends before the picture documents do.
    order = [e.document for e in events if e.type == "document_end"]
    assert order.index(3) < order.index(0) and order.index(3) < order.index(1)


def test_stream_of_one_prompt_and_text_pieces(pipe, scripts):
    plans, free = scripts
    events = list(pipe.stream("Tell a story", generation_kwargs=scripted(plans), generator=seeded(), **FAST))
    texts = [e for e in events if e.type == "text"]
    assert len(texts) >= 2 and all(e.document == 0 for e in events[:-1])
    assert isinstance([e for e in events if e.type == "picture"][0].image, PIL.Image.Image)


@pytest.mark.parametrize("sampled", [False, True])
def test_static_cache_gives_the_dynamic_cache_tokens(pipe, scripts, sampled):
    plans, free = scripts
    if sampled:
        options = dict(
            do_sample=True, generation_kwargs={"logits_processor": LogitsProcessorList([SmallVocabulary(free)])}
        )
    else:
        options = dict(generation_kwargs=scripted(plans))
    kwargs = dict(max_new_tokens=10, max_images=2, output_type="np", **options, **FAST)
    dynamic = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    static = pipe(
        PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], cache_implementation="static", **kwargs
    )
    assert static.text == dynamic.text and static.stop_reasons == dynamic.stop_reasons
    for ours, theirs in zip(static.images, dynamic.images):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, atol=1e-5)


class Widths:
    """Batch size and key/value length of every decode step (one new position) of the language model."""

    def __init__(self, mllm):
        self.steps = []
        self.handle = mllm.model.language_model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if kwargs["inputs_embeds"].shape[1] == 1:
            self.steps.append(tuple(kwargs["attention_mask"].shape))


def test_finished_documents_leave_the_dynamic_batch_and_stay_masked_in_the_static_one(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, **FAST)
    widths = Widths(pipe.mllm)
    out = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    widths.handle.remove()
    batches = [rows for rows, _ in widths.steps]
    assert batches[0] == 3 and batches[-1] == 1 and batches == sorted(batches, reverse=True)  # "Hi" ends at once
    # The cache is never longer than the longest document: pictures leave no padding blocks in the other rows.
    block = len(pipe.processor.drawn_picture_ids)
    streams = []
    for prompt, images, plan in zip(PROMPTS, IMAGES, plans.values()):
        prompt_length = pipe._tokenize([pipe.format_chat_prompt(prompt)], [images] if images else None, "cpu")[0]
        used = plan[: plan.index(EOS)]
        streams.append(prompt_length.shape[1] + sum(block if t == DREAM_START else 1 for t in used))
    assert max(width for _, width in widths.steps) == max(streams)
    del out

    widths = Widths(pipe.mllm)
    pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], cache_implementation="static", **kwargs)
    widths.handle.remove()
    assert set(widths.steps) == {widths.steps[0]} and widths.steps[0][0] == 4


def test_legacy_streamer_follows_one_document(pipe, scripts):
    plans, _ = scripts
    streamer = CollectStreamer()
    out = pipe("Tell a story", generation_kwargs=scripted(plans), streamer=streamer, generator=seeded(), **FAST)
    assert streamer.ended == 1 and len(streamer.puts) == 1 + 5  # the prompt, then a, b, <dream_start>, c, </s>
    assert len(out.images[0]) == 1


def test_pictures_waiting_at_one_step_are_drawn_decoded_and_read_back_together(pipe, scripts):
    plans, _ = scripts
    unet, vae, clip = [], [], []
    handles = [
        pipe.unet.register_forward_hook(lambda module, args, output: unet.append(args[0].shape[0])),
        pipe.vae.decoder.register_forward_hook(lambda module, args, output: vae.append(args[0].shape[0])),
        # The tower stops at the layer it reads; its patch embedding runs once per pass.
        pipe.mllm.model.vision_tower.embeddings.register_forward_hook(
            lambda module, args, output: clip.append(args[0].shape[0])
        ),
    ]
    try:
        out = pipe(
            PROMPTS,
            image=IMAGES,
            generator=[seeded(i) for i in range(4)],
            generation_kwargs=scripted(plans),
            max_new_tokens=12,
            **FAST,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert [len(images) for images in out.images] == [1, 2, 0, 0]
    # Step 2: document 1's first picture alone; step 3: document 0's and document 1's second picture in one batch.
    assert unet == [2, 2, 4, 4]  # [uncond, cond] rows, two denoising steps each
    assert vae == [1, 2]
    assert clip == [1, 1, 2]  # the prompt's picture at prefill, then the drawn ones, batched


def test_a_stream_closed_early_leaves_the_pipeline_usable(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    stream = pipe.stream(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    first = next(event for event in stream if event.type == "picture")
    stream.close()  # a user pressing "stop"
    assert first.document == 1
    out = pipe(PROMPTS, image=IMAGES, generator=[seeded(i) for i in range(4)], **kwargs)
    np.testing.assert_allclose(out.images[1][0], first.image, atol=1e-5)


def test_prompts_of_very_different_lengths_are_read_in_groups_and_still_equal_each_alone(pipe, scripts):
    from dreamllm_hf.pipelines.document_batch import _prefill_groups

    assert _prefill_groups([40, 38, 39]) == [[0, 1, 2]]  # little padding: one forward
    assert _prefill_groups([10, 100, 12, 95]) == [[1, 3], [0, 2]]  # each group in batch order
    _, free = scripts
    prompts = ["Hi", "Describe <image> please", "Tell a long story " + "about the sea and the wind " * 12]
    images = [[], [picture(3)], []]
    lengths = [
        pipe._tokenize([pipe.format_chat_prompt(p)], [i] if i else None, "cpu")[0].shape[1]
        for p, i in zip(prompts, images)
    ]
    assert len(_prefill_groups(lengths)) > 1
    kwargs = dict(
        generation_kwargs={"logits_processor": LogitsProcessorList([SmallVocabulary(free)])},
        do_sample=True,
        max_new_tokens=10,
        max_images=2,
        output_type="np",
        **FAST,
    )
    batch = pipe(prompts, image=images, generator=[seeded(50 + i) for i in range(3)], **kwargs)
    assert sum(len(i) for i in batch.images) > 0
    for index, prompt in enumerate(prompts):
        single = pipe(prompt, image=images[index] or None, generator=[seeded(50 + index)], **kwargs)
        assert_same_document(batch, index, single)


# ---------------------------------------------------------------------------------------------------------------------
# Continuous batching: documents join a running batch and leave it


def request(prompt, images, seed, **kwargs) -> DocumentRequest:
    return DocumentRequest(prompt=prompt, image=images or None, generator=seeded(seed), **kwargs)


def written(writer, submitted: dict[int, int], after: dict[int, list]) -> dict:
    """Steps `writer` to the end; before step `k` it submits the requests `after[k]`. Returns {index: output} and
    the live documents seen at each step."""
    outputs, live, step = {}, [], 0
    while writer.has_work or after:
        for index, item in after.pop(step, []):
            submitted[writer.submit(item)] = index
        for event in writer.step():
            if event.type == "document_end":
                outputs[submitted[event.document]] = event.output
        live.append(list(writer.batch.live_documents))
        step += 1
    return outputs, live


@pytest.mark.parametrize("sampled", [False, True])
def test_a_document_admitted_mid_flight_equals_it_written_alone(pipe, scripts, sampled):
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
    writer = DocumentWriter(pipe)
    # Documents 0 and 2 start the batch; 1 joins at step 2 (document 0 draws then), 3 at step 4.
    after = {
        0: [(0, request(PROMPTS[0], IMAGES[0], 20, **kwargs)), (2, request(PROMPTS[2], IMAGES[2], 22, **kwargs))],
        2: [(1, request(PROMPTS[1], IMAGES[1], 21, **kwargs))],
        4: [(3, request(PROMPTS[3], IMAGES[3], 23, **kwargs))],
    }
    outputs, live = written(writer, {}, after)
    assert len(outputs) == 4 and not writer.has_work
    assert len(live[2]) == 3 and {0, 1} <= set(live[2])  # admitted beside documents being written
    if not sampled:
        assert [len(outputs[i].images[0]) for i in range(4)] == [1, 2, 0, 0]
    for index, prompt in enumerate(PROMPTS):
        alone = pipe(prompt, image=IMAGES[index] or None, generator=[seeded(20 + index)], **kwargs)
        assert_same_document(outputs[index], 0, alone)
    assert writer.batch.cache_rows == 0  # every document left and freed its rows


def test_documents_that_arrive_while_pictures_are_drawn_join_at_the_next_step(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    arrivals = []

    def arrive(documents, step, total):  # another thread's submit, while the UNet draws
        if not arrivals:
            arrivals.append(writer.submit(request(PROMPTS[2], IMAGES[2], 2, **kwargs)))

    writer = DocumentWriter(pipe, on_denoising_step=arrive)
    first = writer.submit(request(PROMPTS[0], IMAGES[0], 0, **kwargs))
    steps = []
    while writer.has_work:
        steps.append(writer.step())
    drew = next(i for i, events in enumerate(steps) if any(e.type == "picture" for e in events))
    joined = next(i for i, events in enumerate(steps) if any(e.document == arrivals[0] for e in events))
    assert joined == drew + 1
    ends = {e.document: e.output for events in steps for e in events if e.type == "document_end"}
    for document, index, seed in ((first, 0, 0), (arrivals[0], 2, 2)):
        alone = pipe(PROMPTS[index], image=IMAGES[index] or None, generator=[seeded(seed)], **kwargs)
        assert_same_document(ends[document], 0, alone)


def test_a_cancelled_document_leaves_and_frees_its_rows_and_the_others_go_on(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    writer = DocumentWriter(pipe)
    ids = [writer.submit(request(PROMPTS[i], IMAGES[i], i, **kwargs)) for i in (0, 2, 1)]
    queued = writer.submit(request(PROMPTS[3], IMAGES[3], 3, **kwargs))
    writer.cancel(queued)  # cancelled before it is read: it never takes a row
    events = writer.step()
    assert [(e.document, e.stop_reason) for e in events if e.type == "document_end"] == [(queued, "cancelled")]
    assert writer.batch.cache_rows == 3
    writer.cancel(ids[1])
    events = writer.step()
    end = next(e for e in events if e.type == "document_end")
    assert end.document == ids[1] and end.stop_reason == StopReason.CANCELLED
    prompt_length = len(pipe.processor(text=pipe.format_chat_prompt(PROMPTS[2]))["input_ids"][0])
    assert end.usage == {"prompt_tokens": prompt_length, "completion_tokens": 1, "pictures": 0}
    assert writer.batch.cache_rows == 2 and ids[1] not in writer.batch.live_documents
    outputs = {}
    while writer.has_work:
        for event in writer.step():
            if event.type == "document_end":
                outputs[event.document] = event.output
    for document, index in ((ids[0], 0), (ids[2], 1)):
        alone = pipe(PROMPTS[index], image=IMAGES[index] or None, generator=[seeded(index)], **kwargs)
        assert_same_document(outputs[document], 0, alone)


def test_a_static_batch_starts_the_documents_added_while_it_runs_once_it_is_empty(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np", **FAST)
    writer = DocumentWriter(pipe, cache_implementation="static")
    first = writer.submit(request(PROMPTS[2], IMAGES[2], 2, **kwargs))
    writer.step()
    later = writer.submit(request(PROMPTS[0], IMAGES[0], 0, **kwargs))
    seen = []
    outputs = {}
    while writer.has_work:
        for event in writer.step():
            if event.type == "document_end":
                outputs[event.document] = event.output
        seen.append(list(writer.batch.live_documents))
    assert all(not ({first, later} <= set(live)) for live in seen)  # never in the fixed-shape batch together
    alone = pipe(PROMPTS[0], generator=[seeded(0)], cache_implementation="static", **kwargs)
    assert_same_document(outputs[later], 0, alone)


def test_a_picture_whose_documents_were_all_cancelled_stops_drawing_and_is_not_shown(pipe, scripts):
    plans, _ = scripts
    kwargs = dict(generation_kwargs=scripted(plans), max_new_tokens=12, output_type="np")
    steps = []

    def cancel_at_first_step(documents, step, total):
        steps.append(step)
        writer.cancel(documents[0])

    writer = DocumentWriter(pipe, on_denoising_step=cancel_at_first_step)
    document = writer.submit(request(PROMPTS[0], IMAGES[0], 0, num_inference_steps=6, **kwargs))
    events = []
    while writer.has_work:
        events.extend(writer.step())
    assert steps == [1]  # the other five denoising steps were skipped
    assert [e.type for e in events].count("picture") == 0
    end = events[-1]
    assert end.type == "document_end" and end.document == document and end.stop_reason == StopReason.CANCELLED
    assert all(isinstance(segment, str) for segment in end.output.documents[0])
    assert writer.batch.cache_rows == 0


def test_a_stream_gives_a_steps_text_and_picture_start_before_the_picture_is_drawn(pipe, scripts):
    plans, _ = scripts
    unet_calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        seen = [
            (event.type, len(unet_calls))
            for event in pipe.stream("Tell a story", generation_kwargs=scripted(plans), generator=seeded(), **FAST)
        ]
    finally:
        hook.remove()
    started = next(calls for kind, calls in seen if kind == "picture_start")
    drawn = next(calls for kind, calls in seen if kind == "picture")
    assert started == 0 and drawn == FAST["num_inference_steps"]
    assert all(calls == 0 for kind, calls in seen[: seen.index(("picture_start", 0))] if kind == "text")
