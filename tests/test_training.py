"""DreamLLM fine-tuning: the two-loss objective against the ORIGINAL code's teacher-forced training goldens, the data
builders, PEFT LoRA/QLoRA, and the accelerate loop (loss goes down, adapters reload, resume is exact).

Everything runs on the converted fixture checkpoint (tests/fixtures/original_tiny) and pictures of the shapes world.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamllm_hf import shapes_world
from dreamllm_hf.shapes_world.data import write_pairs_folder, write_stories_folder


ATOL = 1e-4  # as tests/test_parity_model.py: fp32 reduction-order noise on these sizes is ~3e-6
LOSS_RTOL = 1e-5
TRAIN_SAMPLES = ["train_interleaved_1img", "train_interleaved_2img", "train_t2i_pair", "train_i2t_pair"]


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual, expected, atol=ATOL):
    assert actual is not None
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    diff = (actual.detach().float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: components in fp32, synthetic data
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components(converted_tiny):
    """(mllm fp32, processor, unet fp32, vae fp32, DDPM scheduler) of the converted fixture."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, load_training_components

    args = DreamLLMTrainingArguments(model=str(converted_tiny), data=["unused"], dtype="float32")
    return load_training_components(args)


@pytest.fixture(scope="module")
def processor(components):
    return components[1]


def draw_shape(colour: str, shape: str) -> Image.Image:
    return shapes_world.draw_shape(shapes_world.sample_spec(random.Random(0), colour=colour, shape=shape))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """8 captioned pictures of the shapes world as an image folder (metadata.jsonl) and 4 two-picture stories as
    MMC4-style JSON Lines (`dreamllm_hf.shapes_world.data`)."""
    root = tmp_path_factory.mktemp("toy")
    pairs = write_pairs_folder(root / "pairs", 8, seed=0)
    docs = write_stories_folder(root / "docs", 4, seed=0, pictures=(2, 2)) / "stories.jsonl"
    return {"pairs": pairs, "docs": docs, "cache": root / "hf-cache"}


def _sample_images(spec, goldens, key):
    return None if spec is None else goldens[key][: int(spec.split(":")[1].rstrip("]"))]


# ------------------------------------------------------------------------------------------------------------------
# The loss against the original's teacher-forced training goldens
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_model(components):
    from dreamllm_hf.training import DreamLLMTrainingModel

    mllm, _, unet, vae, scheduler = components
    return DreamLLMTrainingModel(mllm, unet, vae, scheduler).train()


def _golden_inputs(name, goldens, goldens_json):
    sample = goldens_json["training"]["samples"][name]
    return sample, {
        "input_ids": torch.tensor(sample["input_ids"]),
        "labels": torch.tensor(sample["labels"]),
        "pixel_values": _sample_images(sample["images"], goldens, "pixel_values"),
        "diffusion_pixel_values": _sample_images(sample["images_dm"], goldens, "images_dm"),
    }


def _check_against_goldens(out, name, sample, goldens):
    assert out.lm_loss.item() == pytest.approx(sample["lm_loss"], rel=LOSS_RTOL, abs=1e-7)
    assert out.vm_loss.item() == pytest.approx(sample["vm_loss"], rel=LOSS_RTOL, abs=1e-7)
    assert out.loss.item() == pytest.approx(sample["loss"], rel=LOSS_RTOL, abs=1e-7)
    assert_close(out.logits, goldens[f"{name}_logits"])
    if sample["images_dm"] is None:
        assert out.diffusion is None and out.dream_embeddings is None
        return
    d = out.diffusion
    assert_close(out.dream_embeddings, goldens[f"{name}_unet_encoder_hidden_states"])
    assert_close(d.posterior_mean, goldens[f"{name}_vae_posterior_mean"])
    assert_close(d.posterior_std, goldens[f"{name}_vae_posterior_std"])
    assert_close(d.latents, goldens[f"{name}_vae_latents_scaled"])
    assert_close(d.noise, goldens[f"{name}_noise"])
    assert d.timesteps.tolist() == sample["timesteps"] == goldens[f"{name}_timesteps"].long().tolist()
    assert_close(d.noisy_latents, goldens[f"{name}_noisy_latents"])
    assert_close(d.model_pred, goldens[f"{name}_unet_pred"])


@pytest.mark.parametrize("name", TRAIN_SAMPLES)
def test_loss_matches_original_with_its_rng_order(training_model, goldens, goldens_json, name):
    """torch.manual_seed(0) right before the forward, then posterior sample, noise, timesteps: the original's draws."""
    sample, batch = _golden_inputs(name, goldens, goldens_json)
    training_model.train()
    torch.manual_seed(goldens_json["training"]["torch_manual_seed_before_forward"])
    with torch.no_grad():
        out = training_model(**batch)
    _check_against_goldens(out, name, sample, goldens)


@pytest.mark.parametrize("name", ["train_interleaved_2img", "train_t2i_pair"])
def test_loss_matches_original_with_injected_randomness(training_model, goldens, goldens_json, name):
    """The recorded posterior sample, noise and timesteps, injected: no dependence on the RNG at all."""
    sample, batch = _golden_inputs(name, goldens, goldens_json)
    mean, std = goldens[f"{name}_vae_posterior_mean"], goldens[f"{name}_vae_posterior_std"]
    scaling = training_model.vae.config.scaling_factor
    posterior_noise = (goldens[f"{name}_vae_latents_scaled"] / scaling - mean) / std
    torch.manual_seed(1234)  # anything drawn from here would differ from the goldens
    with torch.no_grad():
        out = training_model(
            **batch,
            posterior_noise=posterior_noise,
            noise=goldens[f"{name}_noise"],
            timesteps=goldens[f"{name}_timesteps"].long(),
        )
    _check_against_goldens(out, name, sample, goldens)
    with torch.no_grad():
        again = training_model(
            **batch,
            diffusion_latents=out.diffusion.latents,
            noise=out.diffusion.noise,
            timesteps=out.diffusion.timesteps,
        )
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)  # precomputed latents: same loss
    from dreamllm_hf.training import dreamllm_loss

    with torch.no_grad():
        functional = dreamllm_loss(
            training_model.mllm,
            training_model.unet,
            training_model.vae,
            training_model.noise_scheduler,
            batch,
            diffusion_latents=out.diffusion.latents,
            noise=out.diffusion.noise,
            timesteps=out.diffusion.timesteps,
        )
    assert functional.loss.item() == pytest.approx(sample["loss"], rel=LOSS_RTOL)


def test_loss_generator_is_reproducible_and_independent_of_global_rng(training_model, goldens, goldens_json):
    _, batch = _golden_inputs("train_interleaved_2img", goldens, goldens_json)
    with torch.no_grad():
        torch.manual_seed(1)
        first = training_model(**batch, generator=torch.Generator().manual_seed(7)).vm_loss
        torch.manual_seed(2)
        second = training_model(**batch, generator=torch.Generator().manual_seed(7)).vm_loss
        third = training_model(**batch, generator=torch.Generator().manual_seed(8)).vm_loss
    assert first.item() == second.item() != third.item()


def test_diffusion_gradient_reaches_conditioning_not_frozen_unet(components, goldens, goldens_json):
    """The VM loss flows through the frozen UNet into the condition projector, the dream queries and the LLM."""
    from dreamllm_hf.training import DreamLLMTrainingModel

    mllm, _, unet, vae, scheduler = components
    model = DreamLLMTrainingModel(mllm, unet, vae, scheduler, loss_weight_lm=0.0).train()
    _, batch = _golden_inputs("train_t2i_pair", goldens, goldens_json)
    mllm.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    inner = mllm.model
    for param in (
        inner.condition_projector.weight,
        inner.dream_queries.weight,
        inner.language_model.layers[0].self_attn.q_proj.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    # The image projector was not used by this text-to-image batch: it still gets a (zero) gradient, so that DDP
    # without find_unused_parameters is happy.
    assert inner.multi_modal_projector.weight.grad is not None
    assert inner.multi_modal_projector.weight.grad.abs().sum() == 0
    mllm.zero_grad(set_to_none=True)
    mllm.eval()


def test_loss_refuses_dream_blocks_without_target_pictures(training_model, goldens, goldens_json):
    _, batch = _golden_inputs("train_interleaved_2img", goldens, goldens_json)
    batch["diffusion_pixel_values"] = batch["diffusion_pixel_values"][:1]
    with pytest.raises(ValueError, match="2 dream block"):
        with torch.no_grad():
            training_model(**batch)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def _golden_segments(ids, ids_map, num_queries, num_image_tokens):
    """The text segments of a golden interleaved sample (between BOS, the blocks and EOS)."""
    segments, current, i = [], [], 1
    block = 1 + num_queries + 1 + 1 + num_image_tokens + 1
    while i < len(ids) - 1:
        if ids[i] == ids_map["<dream_start>"]:
            segments.append(current)
            current, i = [], i + block
        else:
            current.append(ids[i])
            i += 1
    return segments + [current]


def _raw_images(goldens):
    return [Image.fromarray(goldens[f"raw_image_{k}"].numpy().astype(np.uint8)) for k in range(2)]


@pytest.fixture(scope="module")
def builder(processor, goldens_json):
    from dreamllm_hf.training import DreamLLMSampleBuilder

    return DreamLLMSampleBuilder(processor, diffusion_resolution=16, random_flip=False)


@pytest.mark.parametrize("name", ["train_interleaved_1img", "train_interleaved_2img"])
def test_document_builder_reproduces_original_sample(builder, processor, goldens, goldens_json, name):
    sample = goldens_json["training"]["samples"][name]
    ids = sample["input_ids"][0]
    segments = _golden_segments(
        ids, goldens_json["ids"], goldens_json["num_dream_queries"], goldens_json["num_image_tokens"]
    )
    texts = [processor.tokenizer.decode(segment) for segment in segments]
    images = _raw_images(goldens)[: len(segments) - 1]
    # MMC4 order is by matched_text_index, not by list order: give them reversed
    out = builder.document(texts, images[::-1], list(range(len(images)))[::-1], builder.rng(0))
    assert out["input_ids"] == ids
    assert out["labels"] == sample["labels"][0]
    assert_close(out["pixel_values"], goldens["pixel_values"][: len(images)], atol=1e-6)
    assert out["diffusion_pixel_values"].shape == (len(images), 3, 16, 16)


def test_pair_builders_reproduce_original_samples(builder, processor, goldens, goldens_json):
    samples = goldens_json["training"]["samples"]
    caption_ids = samples["train_i2t_pair"]["input_ids"][0][2 + goldens_json["num_image_tokens"] + 1 : -1]
    caption = processor.tokenizer.decode(caption_ids)
    image = _raw_images(goldens)[0]
    i2t = builder.image_to_text(image, caption)
    assert i2t["input_ids"] == samples["train_i2t_pair"]["input_ids"][0]
    assert i2t["labels"] == samples["train_i2t_pair"]["labels"][0]
    assert i2t["diffusion_pixel_values"] is None
    t2i = builder.text_to_image(image, caption, builder.rng(0))
    assert t2i["input_ids"] == samples["train_t2i_pair"]["input_ids"][0]
    assert t2i["labels"] == samples["train_t2i_pair"]["labels"][0]
    assert t2i["pixel_values"] is None and t2i["diffusion_pixel_values"].shape == (1, 3, 16, 16)


def test_document_builder_stops_at_max_length(processor):
    from dreamllm_hf.training import DreamLLMSampleBuilder

    builder = DreamLLMSampleBuilder(processor, diffusion_resolution=16, max_length=24)
    image = draw_shape("red", "square")
    out = builder.document(
        ["One two three.", "Four five six seven eight nine ten."], [image, image], [0, 1], builder.rng(0)
    )
    assert len(out["input_ids"]) <= 24 and out["input_ids"][-1] == processor.tokenizer.eos_token_id
    dream_blocks = out["input_ids"].count(processor.special_token_ids["<dream_start>"])
    assert dream_blocks == len(out["diffusion_pixel_values"]) == 1


def test_conversation_samples_learn_the_assistant_turns_and_draw_their_pictures(builder, processor, training_model):
    """A question about a picture (read), then a story whose picture the assistant draws: the sample holds the ids
    the pipeline reads for that conversation, learns only the assistant turns, and trains both losses."""
    from dreamllm_hf.training import DreamLLMDataCollator

    read, drawn = draw_shape("red", "circle"), draw_shape("blue", "square")
    messages = [
        {"role": "user", "content": [read, "What is in the picture?"]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": ["First there was a blue square.", drawn]},
    ]
    sample = builder.conversation(messages, np.random.default_rng(0))
    text = processor.apply_chat_template(
        [
            {"role": "user", "content": "<image>What is in the picture?"},
            {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "First there was a blue square.<dream>"},
        ],
        tokenize=False,
    )
    assert sample["input_ids"] == processor(text=text, images=[[read, drawn]])["input_ids"][0]
    learned = [token for token in sample["labels"] if token != -100]
    assert processor.tokenizer.decode(learned) == "a red circle</s> First there was a blue square.<dream_start></s>"
    assert sample["pixel_values"].shape[0] == 2 and sample["diffusion_pixel_values"].shape[0] == 1

    batch = DreamLLMDataCollator(pad_token_id=processor.tokenizer.pad_token_id)([sample])
    out = training_model(**batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.lm_loss) and torch.isfinite(out.vm_loss) and out.vm_loss > 0


def test_diffusion_transform_follows_torchvision_resize_and_center_crop():
    """Resize(shorter edge, bilinear; long edge truncated) -> CenterCrop (offset rounded) -> flip -> [-1, 1]."""
    from dreamllm_hf.training import DiffusionImageTransform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (31, 45, 3), dtype=np.uint8))  # 45 wide, 31 high
    expected = image.resize((23, 16), Image.BILINEAR).crop((4, 0, 20, 16))  # int(16*45/31)=23; round(3.5)=4
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    transform = DiffusionImageTransform(16)
    assert_close(transform(image), expected, atol=1e-6)
    assert_close(transform(image, flip=True), expected.flip(-1), atol=1e-6)
    square = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert_close(
        transform(square),
        torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1),
        atol=1e-6,
    )


def test_pairs_split_half_and_half_and_are_seedable(processor):
    from dreamllm_hf.training import DreamLLMSampleBuilder

    image = draw_shape("blue", "circle")

    def tasks(seed, epoch):
        builder = DreamLLMSampleBuilder(processor, diffusion_resolution=16, seed=seed)
        return [
            "i2t" if builder.pair(image, "a blue circle", builder.rng(i, epoch))["pixel_values"] is not None else "t2i"
            for i in range(200)
        ]

    first = tasks(0, 0)
    assert 0.4 < first.count("i2t") / len(first) < 0.6
    assert tasks(0, 0) == first
    assert tasks(1, 0) != first and tasks(0, 1) != first
    flips = DreamLLMSampleBuilder(processor, diffusion_resolution=16, i2t_probability=0.0)
    unflipped = flips.diffusion_transform(image)
    flipped = [
        torch.equal(flips.pair(image, "x", flips.rng(i))["diffusion_pixel_values"][0], unflipped.flip(-1))
        for i in range(40)
    ]
    assert 0 < sum(flipped) < 40


def test_local_sources_and_parquet_shards(processor, toy_data, tmp_path):
    import shutil

    from dreamllm_hf.training import DOCUMENTS, PAIRS, build_training_dataset, load_data_source, write_parquet_shards

    cache = str(toy_data["cache"])
    pairs = load_data_source(toy_data["pairs"], cache_dir=cache)
    docs = load_data_source(toy_data["docs"], cache_dir=cache)
    assert (pairs.kind, len(pairs), docs.kind, len(docs)) == (PAIRS, 8, DOCUMENTS, 4)

    # Parquet shards with the pictures embedded: readable after the originals are gone, sample for sample the same.
    copy = tmp_path / "copy"
    shutil.copytree(toy_data["pairs"].parent, copy)
    written = {}
    for name, source in (("pairs", copy / "pairs"), ("docs", copy / "docs" / toy_data["docs"].name)):
        written[name] = write_parquet_shards(source, tmp_path / f"{name}-shards", num_shards=2, cache_dir=cache)
    reference = build_training_dataset([toy_data["pairs"], toy_data["docs"]], processor, 16, cache_dir=cache)
    shutil.rmtree(copy)
    sharded = build_training_dataset(
        [tmp_path / "pairs-shards", tmp_path / "docs-shards"], processor, 16, cache_dir=cache
    )
    assert [len(paths) for paths in written.values()] == [2, 2] and len(sharded) == len(reference) == 12
    for index in range(len(reference)):
        a, b = reference[index], sharded[index]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        for key in ("pixel_values", "diffusion_pixel_values"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key])
    document = reference[8]  # first document: two pictures, each a dream block + an image block
    ids = processor.special_token_ids
    assert document["input_ids"].count(ids["<dream_start>"]) == document["input_ids"].count(ids["<im_start>"]) == 2
    assert document["pixel_values"].shape[0] == document["diffusion_pixel_values"].shape[0] == 2


def test_collator_pads_right_and_concatenates_pictures_in_reading_order():
    from dreamllm_hf.training import DreamLLMDataCollator

    p = [torch.full((1, 3, 2, 2), float(k)) for k in range(3)]
    samples = [
        {"input_ids": [1, 5, 2], "labels": [1, 5, 2], "pixel_values": p[0], "diffusion_pixel_values": None},
        {
            "input_ids": [1, 6, 7, 8, 2],
            "labels": [-100, 6, 7, 8, 2],
            "pixel_values": torch.cat([p[1], p[2]]),
            "diffusion_pixel_values": p[2],
        },
    ]
    batch = DreamLLMDataCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[1, 5, 2, 0, 0], [1, 6, 7, 8, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 5, 2, -100, -100], [-100, 6, 7, 8, 2]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["diffusion_pixel_values"].shape[0] == 1
    assert "diffusion_pixel_values" not in DreamLLMDataCollator(0)(samples[:1])


# ------------------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------------------


def test_lora_targets_llm_linears_only_and_trains_queries_projectors_tokens(converted_tiny):
    from dreamllm_hf.training import apply_lora, format_token_ids, load_mllm

    peft_model = apply_lora(load_mllm(converted_tiny), rank=4, alpha=8)
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    config = peft_model.config
    assert len(lora_layers) == config.text_config.num_hidden_layers * 7
    assert all(".language_model.layers." in name for name in lora_layers)
    assert not any("vision_tower" in name or "lm_head" in name for name in lora_layers)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in name}
    for module in ("dream_queries", "multi_modal_projector", "condition_projector"):
        assert any(f"{module}.modules_to_save" in name for name in trainable), module
    assert any("embed_tokens.token_adapter" in name for name in trainable)
    assert any("lm_head.token_adapter" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    ids = format_token_ids(config)
    assert ids == [
        config.image_start_token_id,
        config.image_patch_token_id,
        config.image_end_token_id,
        config.dream_start_token_id,
        config.dream_end_token_id,
    ]
    assert peft_model.peft_config["default"].trainable_token_indices["lm_head"] == ids
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_activation_checkpointing_gives_the_same_gradients(converted_tiny, goldens, goldens_json):
    from dreamllm_hf.training import apply_lora, load_mllm

    _, batch = _golden_inputs("train_interleaved_1img", goldens, goldens_json)
    del batch["diffusion_pixel_values"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_lora(load_mllm(converted_tiny), rank=4, dropout=0.0, activation_checkpointing=checkpointing)
        model.train()
        layers = model.get_base_model().model.language_model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        out = model(**batch, use_cache=False)
        (out.loss + out.dream_embeddings.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The accelerate loop
# ------------------------------------------------------------------------------------------------------------------


def _args(converted_tiny, toy_data, output_dir, **overrides):
    from dreamllm_hf.training import DreamLLMTrainingArguments

    values = dict(
        model=str(converted_tiny),
        data=[str(toy_data["pairs"]), str(toy_data["docs"])],
        output_dir=str(output_dir),
        max_steps=40,
        seed=0,
        learning_rate=1e-2,
        lr_scheduler="constant",
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        per_device_batch_size=2,
        checkpointing_steps=0,
        dtype="float32",
        cache_dir=str(toy_data["cache"]),
    )
    values.update(overrides)
    return DreamLLMTrainingArguments(**values)


@pytest.fixture(scope="module")
def trained(converted_tiny, toy_data, tmp_path_factory):
    from dreamllm_hf.training import train

    output_dir = tmp_path_factory.mktemp("lora-run")
    result = train(_args(converted_tiny, toy_data, output_dir))
    return result


@pytest.fixture(scope="module")
def eval_batches(processor, toy_data):
    """Every toy sample as text-to-image (diffusion) and as image-to-text (LM), no flips, one batch each."""
    from dreamllm_hf.training import DreamLLMDataCollator, build_training_dataset

    collate = DreamLLMDataCollator(processor.tokenizer.pad_token_id)
    sources = [toy_data["pairs"], toy_data["docs"]]
    cache = str(toy_data["cache"])
    t2i = build_training_dataset(sources, processor, 16, i2t_probability=0.0, random_flip=False, cache_dir=cache)
    i2t = build_training_dataset(sources, processor, 16, i2t_probability=1.0, random_flip=False, cache_dir=cache)
    return collate([t2i[i] for i in range(len(t2i))]), collate([i2t[i] for i in range(len(i2t))])


def _evaluate(mllm, components, eval_batches):
    """(mean diffusion loss over 8 fixed noise draws, LM loss) on the fixed evaluation batches."""
    from dreamllm_hf.training import DreamLLMTrainingModel

    _, _, unet, vae, scheduler = components
    model = DreamLLMTrainingModel(mllm, unet, vae, scheduler).eval()
    t2i, i2t = eval_batches
    with torch.no_grad():
        vm = np.mean([model(**t2i, generator=torch.Generator().manual_seed(s)).vm_loss.item() for s in range(8)])
        lm = model(**i2t).lm_loss.item()
    return vm, lm


@pytest.mark.parametrize("i2t_probability, absent", [(0.0, "lm_loss"), (1.0, "vm_loss")])
def test_the_log_writes_null_for_a_term_no_batch_had(converted_tiny, toy_data, tmp_path, i2t_probability, absent):
    """Text-to-image pairs have no language-model targets and caption pairs no picture to draw: the log says null
    rather than 0.0 (which reads as a perfect loss), and the other term's mean is the mean of the micro-batches."""
    from dreamllm_hf.training import train

    args = _args(
        converted_tiny,
        toy_data,
        tmp_path,
        data=[str(toy_data["pairs"])],
        max_steps=2,
        gradient_accumulation_steps=2,
        i2t_probability=i2t_probability,
        learning_rate=1e-4,
    )
    log = [json.loads(line) for line in train(args).log_path.read_text().splitlines()]
    present = "vm_loss" if absent == "lm_loss" else "lm_loss"
    assert [record["step"] for record in log] == [1, 2]
    assert all(record[absent] is None for record in log)
    assert all(record[present] > 0.01 for record in log)
    if absent == "vm_loss":  # the loss is the LM loss alone: its mean is the mean of the same micro-batches
        assert all(record["loss"] == pytest.approx(record["lm_loss"]) for record in log)


def test_training_lowers_both_losses(trained, converted_tiny, components, eval_batches):
    from dreamllm_hf.training import load_adapter, load_mllm

    log = [json.loads(line) for line in trained.log_path.read_text().splitlines()]
    assert [record["step"] for record in log] == list(range(1, 41))
    assert all({"step", "loss", "lm_loss", "vm_loss"} <= record.keys() for record in log)
    lm = [r["lm_loss"] for r in log if r["lm_loss"] is not None]  # null: a step whose batches had no LM target
    assert len(lm) >= 30
    first, last = np.mean(lm[:5]), np.mean(lm[-5:])
    assert last < 0.7 * first, (first, last)

    vm_before, lm_before = _evaluate(load_mllm(converted_tiny), components, eval_batches)
    vm_after, lm_after = _evaluate(
        load_adapter(load_mllm(converted_tiny), trained.output_dir), components, eval_batches
    )
    assert lm_after < 0.5 * lm_before, (lm_before, lm_after)
    # Measured: 1.091 -> 1.019 (with loss_weight_vm=0 instead, it stays at 1.092).
    assert vm_after < 0.97 * vm_before, (vm_before, vm_after)


def test_adapter_reloads_and_merges_to_the_same_outputs(trained, converted_tiny, goldens, goldens_json):
    from peft import PeftModel
    from safetensors.torch import load_file

    from dreamllm_hf import DreamLLMForConditionalGeneration
    from dreamllm_hf.training import load_adapter, load_mllm

    adapter_files = {p.name for p in Path(trained.output_dir).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.jsonl"} <= adapter_files
    saved = load_file(trained.output_dir / "adapter_model.safetensors")
    base_model = load_mllm(converted_tiny)
    for module in ("dream_queries", "multi_modal_projector", "condition_projector"):
        key = f"base_model.model.model.{module}.weight"
        assert (saved[key] - base_model.get_submodule(f"model.{module}").weight).abs().max() > 1e-3, module
    for layer in ("model.language_model.embed_tokens", "lm_head"):
        delta = saved[f"base_model.model.{layer}.token_adapter.trainable_tokens_delta"]
        assert delta.shape[0] == 5 and delta.abs().max() > 1e-3, layer
    assert sum(".lora_A." in key for key in saved) == 7 * base_model.config.text_config.num_hidden_layers
    _, batch = _golden_inputs("train_interleaved_2img", goldens, goldens_json)
    inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    prompt = torch.tensor([goldens_json["creation"]["prompt_input_ids"]])

    def outputs(model):
        with torch.no_grad():
            out = model(**inputs)
            return out.logits, out.dream_embeddings, model.get_dream_embeddings(prompt).dream_embeddings

    base = outputs(load_mllm(converted_tiny).eval())
    unmerged_model = PeftModel.from_pretrained(load_mllm(converted_tiny), str(trained.output_dir)).eval()
    unmerged = outputs(unmerged_model)
    merged_model = load_adapter(load_mllm(converted_tiny), trained.output_dir, merge=True).eval()
    assert type(merged_model) is DreamLLMForConditionalGeneration
    key = "base_model.model.model.condition_projector.weight"
    assert torch.equal(merged_model.model.condition_projector.weight, saved[key])  # trained module in place
    merged = outputs(merged_model)
    for b, u, m in zip(base, unmerged, merged):
        assert (u - b).abs().max() > 1e-2  # the adapter changed the model ...
        assert_close(m, u, atol=1e-4)  # ... and merging it changes nothing
    # Saved and reloaded merged model: the standalone weights a pipeline's `mllm` can be.
    merged_model.save_pretrained(trained.output_dir / "merged")
    reloaded = DreamLLMForConditionalGeneration.from_pretrained(trained.output_dir / "merged", dtype=torch.float32)
    for m, r in zip(merged, outputs(reloaded.eval())):
        assert_close(r, m, atol=1e-6)


def test_resume_continues_exactly(converted_tiny, toy_data, tmp_path):
    """4 steps in one go == 2 steps, checkpoint, resume to 4 (data order, noise, optimizer, adapter: all restored)."""
    from safetensors.torch import load_file

    from dreamllm_hf.training import find_latest_checkpoint, train

    common = dict(max_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2, lora_dropout=0.1, seed=3)
    train(_args(converted_tiny, toy_data, tmp_path / "straight", **common))
    train(_args(converted_tiny, toy_data, tmp_path / "broken", **{**common, "max_steps": 2}))
    assert find_latest_checkpoint(tmp_path / "broken").name == "checkpoint-2"
    resumed = train(_args(converted_tiny, toy_data, tmp_path / "broken", resume="latest", **common))
    assert resumed.global_step == 4
    straight_log = (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()
    broken_log = (tmp_path / "broken" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line) | {"elapsed_s": 0} for line in broken_log] == [
        json.loads(line) | {"elapsed_s": 0} for line in straight_log
    ]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    checkpoint = tmp_path / "broken" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.bin").exists()
    assert not list(checkpoint.glob("model*.safetensors"))  # the frozen base is not copied into checkpoints


def test_qlora_step_on_cpu(converted_tiny, toy_data, tmp_path):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from dreamllm_hf.training import load_mllm, train

    quantized = load_mllm(converted_tiny, load_in_4bit=True)
    assert isinstance(quantized.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(quantized.model.multi_modal_projector, bnb.nn.Linear4bit)
    result = train(_args(converted_tiny, toy_data, tmp_path, max_steps=2, load_in_4bit=True))
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_B" in key and weights[key].abs().sum() > 0 for key in weights)  # B starts at 0: it moved


def test_cli_options_config_file_and_flags(tmp_path):
    import argparse

    from dreamllm_hf.training.cli import add_train_parser, training_arguments_from_namespace

    config = tmp_path / "train.yaml"
    config.write_text("model: from-file\nmax_steps: 7\nlora-rank: 4\nlearning_rate: 0.001\ndata: [a, b]\n")
    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    namespace = parser.parse_args(
        [
            "train",
            "--config",
            str(config),
            "--max-steps",
            "9",
            "--data",
            "c",
            "--data",
            "d",
            "--output-dir",
            "out",
            "--no-random-flip",
            "--resume",
            "--mixed-precision",
            "bf16",
        ]
    )
    assert namespace.func.__name__ == "run_train"
    args = training_arguments_from_namespace(namespace)
    assert (args.model, args.max_steps, args.lora_rank, args.learning_rate) == ("from-file", 9, 4, 0.001)
    assert args.data == ["c", "d"] and args.output_dir == "out" and args.random_flip is False
    assert args.resume == "latest" and args.mixed_precision == "bf16" and args.weight_dtype() == torch.bfloat16
    assert args.seed == 0 and args.loss_weight_vm == 10.0 and args.loss_weight_lm == 1.0
    with pytest.raises(ValueError, match="Unknown training option"):
        config.write_text("lora_rnk: 4\n")
        training_arguments_from_namespace(parser.parse_args(["train", "--config", str(config)]))
