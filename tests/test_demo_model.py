"""The shipped demo model (`src/dreamllm_hf/demo_model/`): it loads offline and still knows the shapes world.

The bars here are lower than the goals `dreamllm-hf evaluate-demo` measures (captions 0.80, questions 0.85, drawings
and story pictures 0.60, every thing and relation right), so that a change that breaks the model, the processor or
the pipeline is caught without the test becoming a slow benchmark.
"""

import json
import random

import pytest
import torch

from dreamllm_hf import constants as C
from dreamllm_hf.shapes_world.demo_model_path import (
    DEMO_DRAWING,
    DEMO_GUIDANCE_SCALE,
    DEMO_MODEL_PATH,
    DEMO_SEED,
    DEMO_STORY_TOKENS,
)
from dreamllm_hf.shapes_world.scene_evaluation import (
    ANSWER_MAX_NEW_TOKENS,
    CAPTION_MAX_NEW_TOKENS,
    held_out_questions,
    held_out_scenes,
)
from dreamllm_hf.shapes_world.scene_judge import read_things, things_drawn_right
from dreamllm_hf.shapes_world.scenes import (
    COLOURS,
    SCENE_SIZE,
    StoryReader,
    answers_agree,
    captions_agree,
    draw_scene,
    sample_scene,
)


MAX_BYTES = 30 * 1024 * 1024  # the bound on the shipped model
CAPTION_BAR, QUESTION_BAR, THINGS_BAR = 0.5, 0.6, 0.5
FAST = dict(num_inference_steps=20, guidance_scale=DEMO_GUIDANCE_SCALE)


@pytest.fixture(scope="module")
def pipe():
    from dreamllm_hf.pipelines import DreamLLMPipeline

    pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layout_size_and_model_card():
    files = [path for path in DEMO_MODEL_PATH.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    names = {path.relative_to(DEMO_MODEL_PATH).as_posix() for path in files}
    for required in (
        "model_index.json",
        "README.md",
        "mllm/config.json",
        "mllm/model.safetensors",
        "mllm/processor_config.json",
        "mllm/tokenizer.json",
        "processor/processor_config.json",
        "processor/tokenizer.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert required in names, required
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))], (
        "weights must be safetensors"
    )
    assert sum(path.stat().st_size for path in files) <= MAX_BYTES
    index = json.loads((DEMO_MODEL_PATH / "model_index.json").read_text())
    assert index["_class_name"] == "DreamLLMPipeline"
    card = (DEMO_MODEL_PATH / "README.md").read_text()
    assert "train-demo" in card and "evaluate-demo" in card


def test_mllm_folder_is_a_complete_transformers_repository(pipe):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(DEMO_MODEL_PATH / "mllm")
    assert type(processor) is type(pipe.processor)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (DEMO_MODEL_PATH / "mllm" / name).read_bytes() == (DEMO_MODEL_PATH / "processor" / name).read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_PATH / "mllm", dtype=torch.float32).eval()
    inputs = processor(text="<image>", images=draw_scene(sample_scene(random.Random(0))), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, pipe.mllm(**inputs).logits)


def test_loads_offline_as_a_dreamllm_pipeline(pipe):
    from dreamllm_hf.modeling import DreamLLMForConditionalGeneration, DreamLLMProcessor

    assert isinstance(pipe.mllm, DreamLLMForConditionalGeneration)
    assert isinstance(pipe.processor, DreamLLMProcessor)
    assert pipe.unet is not None and pipe.vae is not None and pipe.scheduler is not None
    config = pipe.mllm.config
    assert pipe.processor.num_image_tokens == config.num_image_tokens
    assert pipe.processor.num_dream_queries == config.num_dream_queries
    assert pipe.unet.config.cross_attention_dim == config.cross_attention_dim


def test_tokenizer_has_the_release_special_tokens_in_release_order(pipe):
    tokenizer = pipe.tokenizer
    vocab = tokenizer.get_vocab()
    first = vocab[C.PAD_TOKEN]
    for token, release_id in C.RELEASE_ADDED_TOKEN_IDS.items():
        assert vocab[token] - first == release_id - C.RELEASE_ADDED_TOKEN_IDS[C.PAD_TOKEN], token
    assert first + len(C.RELEASE_ADDED_TOKEN_IDS) == len(tokenizer) == pipe.mllm.config.text_config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a small red circle")["input_ids"])
    assert tokens == ["<s>", "▁a", "▁small", "▁red", "▁circle"]
    # Legacy tokenization: the text after a special token gets its own dummy prefix.
    ids = tokenizer("<image>What is in the picture?")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<s>", "<image>", "▁What"]


def test_captions_of_held_out_pictures(pipe):
    layouts = held_out_scenes("captions", 24, seed=7)  # not the evaluation's seed
    out = pipe(
        ["<image>"] * len(layouts),
        images=[[draw_scene(layout)] for layout in layouts],
        allow_images=False,
        use_chat_template=False,
        do_sample=False,
        max_new_tokens=CAPTION_MAX_NEW_TOKENS,
    )
    right = sum(captions_agree(text, layout.scene) for text, layout in zip(out.text, layouts))
    assert right >= CAPTION_BAR * len(layouts), list(zip(out.text, [layout.scene.caption() for layout in layouts]))


def test_answers_questions_about_held_out_pictures(pipe):
    asked = held_out_questions(24, seed=7)
    out = pipe(
        [[{"role": "user", "content": [{"type": "image"}, question]}] for _, question, _ in asked],
        images=[[draw_scene(layout)] for layout, _, _ in asked],
        allow_images=False,
        do_sample=False,
        max_new_tokens=ANSWER_MAX_NEW_TOKENS,
    )
    right = sum(answers_agree(text, truth) for text, (_, _, truth) in zip(out.text, asked))
    assert right >= QUESTION_BAR * len(asked), [(q, t, a) for (_, q, t), a in zip(asked, out.text)]


def test_text_to_image_follows_the_caption(pipe):
    from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline

    draw = DreamLLMText2ImagePipeline.from_pipe(pipe)  # the same components
    scenes = [layout.scene for layout in held_out_scenes("t2i", 12, seed=7)]
    generators = [torch.Generator("cpu").manual_seed(index) for index in range(len(scenes))]
    images = draw([scene.caption() for scene in scenes], generator=generators, **FAST).images
    assert images[0].size == (SCENE_SIZE, SCENE_SIZE)
    things = sum(things_drawn_right(image, scene) for image, scene in zip(images, scenes))
    asked = sum(len(scene.things) for scene in scenes)
    assert things >= THINGS_BAR * asked, [(scene.caption(), read_things(image)) for scene, image in zip(scenes, images)]


def test_an_interleaved_story_draws_pictures(pipe):
    out = pipe(
        "Tell me a story.",
        do_sample=True,
        max_new_tokens=DEMO_STORY_TOKENS,
        max_images=4,
        generator=torch.Generator("cpu").manual_seed(DEMO_SEED),
        **FAST,
    )
    document = out.documents[0]
    assert isinstance(document[0], str) and StoryReader().read(document[0].strip()) is not None, document[0]
    assert len(out.images[0]) >= 2
    assert out.images[0][0].size == (SCENE_SIZE, SCENE_SIZE)


def test_evaluate_demo_prints_the_four_figures_last(capsys):
    from dreamllm_hf.shapes_world.cli import main

    argv = ["evaluate-demo", "--num-caption-pictures", "4", "--num-questions", "4", "--num-t2i-captions", "2"]
    argv += ["--t2i-per-caption", "1", "--num-stories", "1", "--num-inference-steps", "8"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    for key in ("caption_accuracy", "question_accuracy", "t2i_accuracy", "interleaved_match"):
        assert 0.0 <= figures[key] <= 1.0


def test_main_demo_command_writes_an_illustrated_story(tmp_path, capsys):
    from dreamllm_hf.cli import main

    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    story = tmp_path / "story.html"
    assert f"Story written to {story.resolve()}" in printed
    page = story.read_text()
    assert page.count('src="data:image/png;base64,') >= 1  # at least one drawn picture, embedded
    assert any(name in page for name in COLOURS)  # and the text around it
    assert (tmp_path / (DEMO_DRAWING.replace(" ", "_") + ".png")).is_file()
