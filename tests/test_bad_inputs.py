"""Every bad input is refused before any work starts, with an error that names the argument, what was given and what
is expected; good but awkward inputs still work.

One table of bad inputs: the document pipeline, text-to-image, the model's public methods, the processor and the
command lines (exit code 2, a one-line error). A spy on every model component asserts that no row reached one.
"""

import re

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline import FAST, load_pipeline, picture, seeded

from dreamllm_hf import cli
from dreamllm_hf.checks import InputTypeError
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pipe(converted_tiny):
    return load_pipeline(converted_tiny)


@pytest.fixture(scope="module")
def t2i(pipe):
    return DreamLLMText2ImagePipeline.from_pipe(pipe)


class ModelSpy:
    """Records every forward of the language model, the vision tower, the UNet and the VAE's decoder."""

    def __init__(self, pipe):
        self.calls = []
        modules = {
            "language_model": pipe.mllm.model.language_model,
            "vision_tower": pipe.mllm.model.vision_tower.embeddings,  # the first module of every tower pass
            "unet": pipe.unet,
            "vae.decoder": pipe.vae.decoder,
        }
        self.handles = [
            module.register_forward_pre_hook(lambda module, args, name=name: self.calls.append(name))
            for name, module in modules.items()
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def spy(pipe):
    watcher = ModelSpy(pipe)
    yield watcher
    watcher.remove()


@pytest.fixture
def no_loading(monkeypatch):
    """A command line that refuses its options must do so before it loads a model or starts training."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded (or training started) for options that should have been refused")

    monkeypatch.setattr(DreamLLMPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(DreamLLMText2ImagePipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("dreamllm_hf.training.trainer.train", refuse)


def image_ids(pipe, text="<image> hi"):
    """`input_ids` of `text` with its `<image>` expanded into a block, as `forward` reads them."""
    return torch.tensor([pipe.processor.expand_placeholders(pipe.tokenizer(text)["input_ids"])])


def run_cli(argv: str, saved_pipeline, capsys) -> str:
    """Runs `dreamllm-hf ARGV` (`MODEL` stands for the saved tiny pipeline); returns the error line it exits 2 with."""
    args = [str(saved_pipeline) if word == "MODEL" else word for word in argv.split()]
    with pytest.raises(SystemExit) as exit_info:
        parsed = cli.build_parser().parse_args(args)
        parsed.func(parsed)
    assert exit_info.value.code == 2, exit_info.value.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("dreamllm-hf ") and ": error: " in lines[-1], lines
    return lines[-1]


def call(target: str, kwargs: dict, pipe, t2i, saved_pipeline, capsys, tmp_path):
    """Calls `target` with the row's arguments (pipeline calls also get the fast test settings)."""
    fast = {k: v for k, v in FAST.items() if k not in kwargs}
    if target == "documents":
        return pipe(**{"prompt": "a bird", **fast, **kwargs})
    if target == "text2image":
        prompt = {} if "prompt_embeds" in kwargs else {"prompt": "a bird"}
        return t2i(**{**prompt, **fast, **kwargs})
    if target == "processor":
        return pipe.processor(**kwargs)
    if target in ("get_image_features", "get_dream_embeddings", "forward"):
        arguments = {k: v(pipe) if callable(v) else v for k, v in kwargs.items()}
        return getattr(pipe.mllm, target)(**arguments)
    if target == "cli":
        argv = kwargs["argv"]
        if "CONFIG" in argv:
            config = tmp_path / "train.yaml"
            config.write_text(kwargs["config"])
            argv = argv.replace("CONFIG", str(config))
        raise ValueError(run_cli(argv, saved_pipeline, capsys))  # checked against the row's pattern below
    raise AssertionError(target)


def nan_tensor(*shape):
    return torch.full(shape, float("nan"))


TENSOR_ROW = "[batch, 4, 16]"  # the tiny model: 4 dream queries, UNet cross_attention_dim 16

# (what is called, its bad argument(s), the error, a pattern the message must match: the argument and what is expected)
BAD_INPUTS = [
    # -- DreamLLMPipeline (documents) ---------------------------------------------------------------------------------
    ("documents", dict(prompt=42, allow_images=False), TypeError, r"`prompt` must be a string, a conversation .* or a non-empty list of those; got int"),
    ("documents", dict(prompt=[], allow_images=False), ValueError, r"`prompt` must be a string, a conversation .* or a non-empty list of those; got list"),
    ("documents", dict(num_inference_steps=0), ValueError, r"`num_inference_steps` must be a positive integer, got 0"),
    ("documents", dict(num_inference_steps=2.5), TypeError, r"`num_inference_steps` must be a positive integer, got 2.5 \(float\)"),
    ("documents", dict(num_inference_steps=5000), ValueError, r"DDPMScheduler cannot take this schedule: `num_inference_steps`: 5000 cannot be larger"),
    ("documents", dict(guidance_scale=float("nan")), ValueError, r"`guidance_scale` must be a finite number >= 0, got nan"),
    ("documents", dict(guidance_scale=-2.0), ValueError, r"`guidance_scale` must be a finite number >= 0, got -2.0"),
    ("documents", dict(guidance_scale="7.5"), TypeError, r"`guidance_scale` must be a finite number >= 0, got '7.5' \(str\)"),
    ("documents", dict(guidance_rescale=1.5), ValueError, r"`guidance_rescale` must be a finite number in \[0, 1\], got 1.5"),
    ("documents", dict(eta=float("inf")), ValueError, r"`eta` must be a finite number in \[0, 1\], got inf"),
    ("documents", dict(temperature=0.0, do_sample=True), ValueError, r"`temperature` must be a finite number > 0 or None, got 0.0"),
    ("documents", dict(top_p=1.5), ValueError, r"`top_p` must be a finite number in \(0, 1\] or None, got 1.5"),
    ("documents", dict(top_k=-1), ValueError, r"`top_k` must be a non-negative integer or None, got -1"),
    ("documents", dict(repetition_penalty=0, allow_images=False), ValueError, r"`repetition_penalty` must be a finite number > 0 or None, got 0"),
    ("documents", dict(max_new_tokens=True), TypeError, r"`max_new_tokens` must be a positive integer, got True \(bool\)"),
    ("documents", dict(max_images=-1), ValueError, r"`max_images` must be a non-negative integer or None, got -1"),
    ("documents", dict(num_images_per_prompt=0), ValueError, r"`num_images_per_prompt` must be a positive integer, got 0"),
    ("documents", dict(height=15), ValueError, r"`height` and `width` must be divisible by the VAE factor 2; got 15x16"),
    ("documents", dict(height=7), ValueError, r"divisible by the VAE factor 2; got 7x16\. Round them to a multiple of 2 \(for example 8x16\)"),
    ("documents", dict(width=0), ValueError, r"`width` must be a positive integer, got 0"),
    ("documents", dict(height=16.0), TypeError, r"`height` must be a positive integer, got 16.0 \(float\)"),
    ("documents", dict(timesteps=[999, -1]), ValueError, r"`timesteps` must be a list of non-negative integers, got -1 in it"),
    ("documents", dict(timesteps=[999, 500], sigmas=[1.0, 0.5]), ValueError, r"Pass custom `timesteps` or `sigmas`, not both"),
    ("documents", dict(generator=[seeded(), seeded()]), ValueError, r"Got 2 generators for 1 documents; give one per document"),
    ("documents", dict(generator="seed"), TypeError, r"`generator` must be a `torch.Generator` or a list of them, got str"),
    ("documents", dict(callback_on_step_end=42), TypeError, r"`callback_on_step_end` must be a callable .*, got int"),
    ("documents", dict(generation_kwargs=[("top_k", 3)]), TypeError, r"`generation_kwargs` must be a dict .*, got list"),
    ("documents", dict(prompt="<image> hi", image=[np.zeros((0, 4, 3), np.uint8)]), ValueError, r"Picture 0 is empty: an array of shape \(0, 4, 3\)"),
    ("documents", dict(prompt="<image> hi", image=[np.full((8, 8, 3), np.nan, np.float32)]), ValueError, r"Picture 0 holds NaN or infinite values"),
    ("documents", dict(prompt="<image> hi", image=[np.zeros((8, 8, 5), np.uint8)]), ValueError, r"Picture 0 has shape \(8, 8, 5\): expected HW, HWC or CHW with 1, 3 or 4 channels"),
    ("documents", dict(prompt="<image> hi", image=[np.full((8, 8, 3), -0.5, np.float32)]), ValueError, r"Picture 0 has values in \[-0.5, -0.5\]; give 8-bit values in \[0, 255\], floats in \[0, 1\]"),
    ("documents", dict(prompt="<image> hi", image=[picture(), picture()]), ValueError, r"1 `<image>`/`<dream>` placeholders without a picture of their own .* but `image` has 2 pictures"),
    ("documents", dict(prompt="<image> hi", image=[{"not": "a picture"}]), TypeError, r"Unsupported image type dict"),
    # -- DreamLLMText2ImagePipeline -------------------------------------------------------------------------------------
    ("text2image", dict(prompt=42), TypeError, r"`prompt` must be a string or a list of strings .*got int"),
    ("text2image", dict(guidance_rescale=-0.1), ValueError, r"`guidance_rescale` must be a finite number in \[0, 1\], got -0.1"),
    ("text2image", dict(prompt_embeds=torch.zeros(1, 4, 8)), ValueError, r"`prompt_embeds` has shape \(1, 4, 8\), expected \[batch, 4, 16\]: .*cross_attention_dim 16"),
    ("text2image", dict(prompt_embeds=torch.zeros(1, 7, 16)), ValueError, r"`prompt_embeds` has shape \(1, 7, 16\), expected \[batch, 4, 16\]: .*4 dream queries"),
    ("text2image", dict(prompt_embeds=torch.zeros(4, 16)), ValueError, r"`prompt_embeds` must be \[batch, 4, 16\] \(3 dimensions\), got shape \(4, 16\)"),
    ("text2image", dict(prompt_embeds=nan_tensor(1, 4, 16)), ValueError, r"`prompt_embeds` holds NaN or infinite values"),
    ("text2image", dict(prompt_embeds=torch.zeros(1, 4, 16, dtype=torch.long)), TypeError, r"`prompt_embeds` must be a floating-point tensor .*got dtype torch.int64"),
    ("text2image", dict(prompt_embeds=[[0.0] * 16] * 4), TypeError, r"`prompt_embeds` must be a torch.Tensor .*, got list"),
    ("text2image", dict(prompt_embeds=torch.zeros(2, 4, 16), negative_prompt_embeds=torch.zeros(3, 4, 16)), ValueError, r"`negative_prompt_embeds` has 3 rows, expected 1 or 2 \(one per prompt\)"),
    ("text2image", dict(latents=torch.zeros(1, 4, 4, 4)), ValueError, r"`latents` have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"),
    ("text2image", dict(latents=torch.zeros(1, 4, 8, 8), num_images_per_prompt=2), ValueError, r"`latents` have shape \(1, 4, 8, 8\), expected \(2, 4, 8, 8\): \(prompts x num_images_per_prompt"),
    ("text2image", dict(latents=nan_tensor(1, 4, 8, 8)), ValueError, r"`latents` holds NaN or infinite values"),
    ("text2image", dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int32)), TypeError, r"`latents` must be a floating-point tensor"),
    ("text2image", dict(num_images_per_prompt=2, generator=[seeded()]), ValueError, r"Got 1 generators for 2 pictures"),
    ("text2image", dict(sigmas=[1.0, 0.5]), ValueError, r"DDPMScheduler cannot take this schedule: .* does not support custom sigmas"),
    # -- the model's public methods -------------------------------------------------------------------------------------
    ("get_image_features", dict(pixel_values=torch.zeros(1, 3, 16, 16)), ValueError, r"`pixel_values` have shape \(1, 3, 16, 16\), expected \(num_images, 3, 28, 28\)"),
    ("get_image_features", dict(pixel_values=torch.zeros(3, 28, 28)), ValueError, r"`pixel_values` have shape \(3, 28, 28\), expected \(num_images, 3, 28, 28\)"),
    ("get_image_features", dict(pixel_values=np.zeros((1, 3, 28, 28), np.float32)), TypeError, r"`pixel_values` must be a torch.Tensor .*got ndarray"),
    ("get_image_features", dict(pixel_values=torch.zeros(1, 3, 28, 28, dtype=torch.uint8)), TypeError, r"`pixel_values` must be floating point .*got torch.uint8"),
    ("get_image_features", dict(pixel_values=nan_tensor(1, 3, 28, 28)), ValueError, r"`pixel_values` hold NaN or infinite values"),
    ("forward", dict(input_ids=image_ids, pixel_values=torch.zeros(1, 3, 16, 16)), ValueError, r"`pixel_values` have shape \(1, 3, 16, 16\), expected \(num_images, 3, 28, 28\)"),
    ("forward", dict(input_ids=image_ids, pixel_values=torch.zeros(2, 3, 28, 28)), ValueError, r"1 image block\(s\) .* but 2 image\(s\) were given in `pixel_values`"),
    ("get_dream_embeddings", dict(input_ids=torch.tensor([[1, 5000]])), ValueError, r"`input_ids` hold ids in \[1, 5000\], but the vocabulary has 1008"),
    ("get_dream_embeddings", dict(input_ids=torch.ones(1, 2)), TypeError, r"`input_ids` must be a 2-D integer tensor \(batch, sequence_length\)"),
    ("get_dream_embeddings", dict(input_ids=torch.tensor([[1, 5]]), attention_mask=torch.ones(1, 3)), ValueError, r"`attention_mask` has shape \(1, 3\), expected \(1, 2\)"),
    # -- the processor --------------------------------------------------------------------------------------------------
    ("processor", dict(text="<image> and <image>", images=[picture()]), ValueError, r"2 `<image>`/`<dream>` placeholders but 1 pictures"),
    ("processor", dict(text="<image>", images=[np.zeros((8, 8, 3), np.complex64)]), TypeError, r"Picture 0 has dtype complex64: give uint8 or uint16 pixels, or floats"),
    ("processor", dict(text="<image>", images=[PIL.Image.new("RGB", (0, 0))]), ValueError, r"Picture 0 is empty \(0x0 pixels\)"),
    ("processor", dict(text="<image>", images=[np.full((8, 8), 70000, np.int32)]), ValueError, r"Picture 0 has values in \[70000, 70000\]; give 8-bit values"),
    # -- the command lines: argparse's one-line error, exit code 2, before anything loads ------------------------------
    ("cli", dict(argv="generate --model MODEL x --steps 0"), ValueError, r"argument --steps: must be a positive integer, got '0'"),
    ("cli", dict(argv="generate --model MODEL x --guidance-scale nan"), ValueError, r"argument --guidance-scale: must be a finite number >= 0, got 'nan'"),
    ("cli", dict(argv="generate --model MODEL x --top-p 1.5"), ValueError, r"argument --top-p: must be a finite number in \(0, 1\], got '1.5'"),
    ("cli", dict(argv="generate --model MODEL x --seed -1"), ValueError, r"argument --seed: must be an integer in \[0, 2\*\*64 - 1\], got '-1'"),
    ("cli", dict(argv="generate --model MODEL x --max-new-tokens 2.5"), ValueError, r"argument --max-new-tokens: must be a positive integer, got '2.5'"),
    ("cli", dict(argv="generate --model MODEL x --out x.html --height 15"), ValueError, r"argument --height: must be a multiple of 2 for this model .*got 15; try 16"),
    ("cli", dict(argv="train --config CONFIG", config="learning_rate: -1.0\n"), ValueError, r"`learning_rate` must be a finite number > 0, got -1.0"),
    ("cli", dict(argv="train --config CONFIG", config="i2t_probability: 2\n"), ValueError, r"`i2t_probability` must be a finite number in \[0, 1\], got 2"),
    ("cli", dict(argv="train --lora-dropout 1.0"), ValueError, r"`lora_dropout` must be a finite number in \[0, 1\), got 1.0"),
    ("cli", dict(argv="train --batch-size 0"), ValueError, r"`per_device_batch_size` must be a positive integer, got 0"),
    ("cli", dict(argv="train --global-batch-size 3 --batch-size 2"), ValueError, r"`global_batch_size` 3 is not a multiple of 1 process\(es\) x `per_device_batch_size` 2 = 2: no process count splits it"),
    ("cli", dict(argv="evaluate fid --reference x --steps 0"), ValueError, r"argument --steps: must be a positive integer, got '0'"),
    ("cli", dict(argv="evaluate captions --data x --batch-size 0"), ValueError, r"argument --batch-size: must be a positive integer, got '0'"),
    ("cli", dict(argv="evaluate-demo --num-inference-steps -2"), ValueError, r"argument --num-inference-steps: must be a positive integer, got '-2'"),
    ("cli", dict(argv="serve --port 70000"), ValueError, r"argument --port: must be an integer in \[1, 65535\], got '70000'"),
    ("cli", dict(argv="demo --seed -3"), ValueError, r"argument --seed: must be an integer in \[0, 2\*\*64 - 1\], got '-3'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "target, kwargs, error, pattern",
    [pytest.param(*row, id=f"{number:02d}-{row[0]}-{'-'.join(row[1])}") for number, row in enumerate(BAD_INPUTS)],
)
def test_bad_inputs_are_refused_before_any_model_work(
    target, kwargs, error, pattern, pipe, t2i, spy, no_loading, saved_pipeline, capsys, tmp_path
):
    with pytest.raises(error, match=pattern) as refused:
        call(target, kwargs, pipe, t2i, saved_pipeline, capsys, tmp_path)
    assert isinstance(refused.value, ValueError)  # a wrong type too: `except ValueError` sees every bad input
    if error is TypeError:
        assert isinstance(refused.value, InputTypeError)
    assert "\n" not in str(refused.value)
    assert spy.calls == [], f"model work before the error: {spy.calls}"


def test_a_prompt_longer_than_the_context_is_refused_before_the_unconditional_pass(pipe, spy, monkeypatch):
    monkeypatch.setattr(pipe.mllm.config.text_config, "max_position_embeddings", 40)
    with pytest.raises(ValueError, match="The prompt takes .* positions .* the model's context is 40 positions"):
        pipe("word " * 60, **FAST)
    assert spy.calls == []


def test_the_spy_sees_model_work(pipe, t2i, spy):
    """So that an empty `spy.calls` above means no model work, not a spy that sees nothing."""
    t2i("a bird", **FAST)
    pipe.mllm.get_image_features(torch.zeros(1, 3, 28, 28))
    assert {"language_model", "unet", "vae.decoder", "vision_tower"} <= set(spy.calls)


def test_generate_turns_a_refused_call_into_exit_code_2(saved_pipeline, tmp_path, capsys):
    """What only the loaded pipeline can refuse is still argparse's one-line error, and nothing is written."""
    out = tmp_path / "x.html"
    line = run_cli(f"generate --model MODEL x --out {out} --steps 2 --negative-prompt <image>", saved_pipeline, capsys)
    assert "`negative_prompt` cannot hold `<image>`" in line and not out.exists()


def test_the_table_is_large_and_covers_every_entry_point():
    assert len(BAD_INPUTS) >= 25
    assert {row[0] for row in BAD_INPUTS} == {
        "documents",
        "text2image",
        "get_image_features",
        "forward",
        "get_dream_embeddings",
        "processor",
        "cli",
    }


# ----------------------------------------------------------------------------------------------------------------------
# Good but awkward inputs still work


def rgb(size=(20, 24)):
    return np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)


def gray(size=(20, 24)):
    return np.asarray(PIL.Image.fromarray(rgb(size)).convert("L"))


# (name, a picture, a picture it must read exactly like, or None: it must only be read)
AWKWARD_PICTURES = [
    ("RGBA", PIL.Image.fromarray(rgb()).convert("RGBA"), PIL.Image.fromarray(rgb())),
    ("grayscale L", PIL.Image.fromarray(gray()), None),
    ("palette P", PIL.Image.fromarray(rgb()).convert("P"), None),
    ("16-bit PIL I;16", PIL.Image.fromarray(gray().astype(np.uint16) * 257), PIL.Image.fromarray(gray())),
    ("16-bit uint16 array", rgb().astype(np.uint16) * 257, rgb()),
    ("float array in [0, 1]", rgb().astype(np.float32) / 255, rgb()),
    ("float array in [0, 255]", rgb().astype(np.float64), rgb()),
    ("float CHW tensor in [0, 1]", torch.from_numpy(rgb()).permute(2, 0, 1).float() / 255, rgb()),
    ("2-D uint8 array", gray(), PIL.Image.fromarray(gray())),
    ("boolean mask", gray() > 128, PIL.Image.fromarray(((gray() > 128) * 255).astype(np.uint8))),
    ("one pixel wide", PIL.Image.fromarray(rgb((24, 1))), None),
    ("one pixel", PIL.Image.fromarray(rgb((1, 1))), None),
]


@pytest.mark.parametrize("name, image, same_as", AWKWARD_PICTURES, ids=[row[0] for row in AWKWARD_PICTURES])
def test_awkward_pictures_are_read_as_the_pictures_they_are(pipe, name, image, same_as):
    pixel_values = pipe.processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 28, 28) and torch.isfinite(pixel_values).all()
    if same_as is not None:
        expected = pipe.processor(text="<image>", images=[same_as], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, expected, atol=0.0, rtol=0.0)
    # and a black picture is not what any of them became (floats in [0, 1] used to be read as almost black)
    black = pipe.processor(text="<image>", images=[np.zeros((20, 24, 3), np.uint8)], return_tensors="pt")
    assert not torch.equal(pixel_values, black["pixel_values"])


def test_a_16_bit_file_is_read_like_its_8_bit_copy(tmp_path):
    from dreamllm_hf.training.data import load_image

    PIL.Image.fromarray(gray().astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode.startswith("I")  # PIL's convert("RGB") would clip it white
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.png"))[..., 0], gray())


AWKWARD_CALLS = [
    ("documents read an RGBA, a grayscale and a palette picture", "documents", dict(prompt="<image><image><image> What are these?", image=[row[1] for row in AWKWARD_PICTURES[:3]], allow_images=False)),
    ("a whitespace-only prompt is an empty user turn", "documents", dict(prompt="   ", allow_images=False)),
    ("an empty prompt without the template is <s> alone", "documents", dict(prompt="", use_chat_template=False, allow_images=False)),
    ("an empty caption is the unconditional", "text2image", dict(prompt="")),
    ("a numpy integer size and the edge values of the ranges", "text2image", dict(height=np.int64(16), guidance_rescale=1.0, eta=1.0, guidance_scale=0.0)),
    ("float64 latents are cast to the UNet's dtype", "text2image", dict(latents=torch.randn(1, 4, 8, 8, dtype=torch.float64))),
    ("one unconditional row is shared by every prompt", "text2image", dict(prompt_embeds=torch.randn(2, 4, 16), negative_prompt_embeds=torch.randn(1, 4, 16))),
    ("custom timesteps the scheduler takes", "text2image", dict(timesteps=[999, 499])),
]  # fmt: skip


@pytest.mark.parametrize("target, kwargs", [row[1:] for row in AWKWARD_CALLS], ids=[row[0] for row in AWKWARD_CALLS])
def test_awkward_but_good_calls_succeed(pipe, t2i, target, kwargs):
    if target == "documents":
        output = pipe(**{"max_new_tokens": 2, "generator": [seeded()], **kwargs})
        assert isinstance(output.text[0], str) and output.stop_reasons[0] is not None
    else:
        prompt = {} if "prompt_embeds" in kwargs else {"prompt": "a bird"}
        images = t2i(**{**prompt, **FAST, "output_type": "np", "generator": seeded(), **kwargs}).images
        rows = kwargs["prompt_embeds"].shape[0] if "prompt_embeds" in kwargs else 1
        assert images.shape == (rows, 16, 16, 3) and np.isfinite(images).all()


def test_whitespace_prompts_keep_their_meaning(pipe):
    """An empty caption draws the unconditional; an empty user turn still gets the chat template around it."""
    assert pipe.format_chat_prompt("   ").endswith("ASSISTANT:") and "USER:" in pipe.format_chat_prompt("   ")


def test_the_cli_accepts_the_edges_of_its_ranges():
    parsed = cli.build_parser().parse_args(
        "generate --model m x --steps 1 --guidance-scale 0 --top-p 1 --seed 18446744073709551615 --max-images 0".split()
    )
    assert (parsed.steps, parsed.guidance_scale, parsed.top_p, parsed.seed, parsed.max_images) == (
        1,
        0.0,
        1.0,
        2**64 - 1,
        0,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's data: bad records are errors naming the source and record; unreadable pictures of documents are skipped,
# counted and reported


@pytest.fixture
def builder(pipe):
    from dreamllm_hf.training.data import DreamLLMSampleBuilder

    return DreamLLMSampleBuilder(pipe.processor, diffusion_resolution=16, i2t_probability=0.5, random_flip=False)


@pytest.fixture
def pictures(tmp_path):
    PIL.Image.fromarray(rgb()).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture at all")
    return tmp_path


def dataset_of(records, folder, builder, path="records.jsonl"):
    import datasets

    from dreamllm_hf.training.data import DreamLLMDataset, source_from_dataset

    source = source_from_dataset(datasets.Dataset.from_list(records), base_dir=str(folder), path=path)
    return DreamLLMDataset([source], builder)


DOCUMENT = {
    "text_list": ["A cat sat.", "It left."],
    "image_info": [{"image_name": "good.png", "matched_text_index": 0}],
}
BAD_RECORDS = [
    ("a pair without text", {"image": "good.png", "text": None}, r"records.jsonl, record 1: no text \(its 'text' is None\)"),
    ("a pair whose picture cannot be opened", {"image": "broken.png", "text": "a cat"}, r"records.jsonl, record 1: its picture broken.png cannot be opened"),
    ("a pair whose picture is missing", {"image": "gone.png", "text": "a cat"}, r"records.jsonl, record 1: its picture gone.png cannot be opened"),
    ("a document without text", {**DOCUMENT, "text_list": None}, r"records.jsonl, record 1: no text \(its 'text_list' is None\)"),
    ("a document whose picture points nowhere", {**DOCUMENT, "image_info": [{"image_name": "good.png", "matched_text_index": 5}]}, r"records.jsonl, record 1: image_info\[0\] has matched_text_index 5, which points at no sentence; the document has 2 \(indices 0 to 1\)"),
    ("a document picture at a negative index", {**DOCUMENT, "image_info": [{"image_name": "good.png", "matched_text_index": -1}]}, r"record 1: image_info\[0\] has matched_text_index -1, which points at no sentence"),
]  # fmt: skip


@pytest.mark.parametrize("record, pattern", [row[1:] for row in BAD_RECORDS], ids=[row[0] for row in BAD_RECORDS])
def test_bad_training_records_are_errors_naming_the_source_and_record(builder, pictures, record, pattern):
    first = {"image": "good.png", "text": "fine"} if "image" in record else DOCUMENT
    dataset = dataset_of([first, record], pictures, builder)
    assert dataset[0]["input_ids"]  # the good record before it
    with pytest.raises(ValueError, match=pattern):
        dataset[1]


def test_a_document_picture_that_cannot_be_opened_is_left_out_counted_and_logged(builder, pictures, caplog):
    from dreamllm_hf.training.data import DreamLLMDataCollator

    info = [{"image_name": "broken.png", "matched_text_index": 0}, {"image_name": "good.png", "matched_text_index": 1}]
    dataset = dataset_of([{"text_list": ["A cat sat.", "It left."], "image_info": info}], pictures, builder)
    with caplog.at_level("WARNING", logger="dreamllm_hf.training.data"):
        sample = dataset[0]
    dream_start = pipe_token(builder, "<dream_start>")
    assert sample["input_ids"].count(dream_start) == 1 and sample["diffusion_pixel_values"].shape[0] == 1
    assert len(sample["skipped_pictures"]) == 1 and "picture 0 (broken.png)" in sample["skipped_pictures"][0]
    assert re.search(r"records.jsonl, record 0: left out picture 0 \(broken.png\)", caplog.text)
    batch = DreamLLMDataCollator(pad_token_id=0)([sample, dataset[0]])
    assert int(batch["skipped_pictures"]) == 2
    assert "skipped_pictures" not in DreamLLMDataCollator(pad_token_id=0)([builder.document(["Hi."], [], [], None)])


def pipe_token(builder, token: str) -> int:
    return builder.processor.special_token_ids[token]


def test_the_trainer_logs_how_many_pictures_it_left_out(converted_tiny, pictures, tmp_path):
    """The count reaches train_log.jsonl; the step itself trains on what was left."""
    import json

    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    info = [{"image_name": "broken.png", "matched_text_index": 0}, {"image_name": "good.png", "matched_text_index": 1}]
    record = {"text_list": ["A cat sat.", "It left."], "image_info": info}
    (pictures / "docs.jsonl").write_text(json.dumps(record) + "\n")
    args = DreamLLMTrainingArguments(
        model=str(converted_tiny),
        data=[str(pictures / "docs.jsonl")],
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        lora_rank=4,
        checkpointing_steps=0,
        dtype="float32",
        cache_dir=str(tmp_path / "cache"),
    )
    log = [json.loads(line) for line in train(args).log_path.read_text().splitlines()]
    assert [(entry["step"], entry["skipped_pictures"]) for entry in log] == [(1, 1)]
    assert log[0]["vm_loss"] is not None  # the picture that opened was still drawn
