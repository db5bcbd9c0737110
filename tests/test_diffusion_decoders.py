"""Any Stable Diffusion decoder: SD 1.x/2.x UNets of two conditioning widths, an SDXL-like UNet (pooled `text_embeds`
from the pooled projector, `time_ids` from the picture size) and an `addition_embed_type="text"` UNet, each through
text-to-image, a document, `get_dream_embeddings`, save/load and a training step; and the clear errors for decoders
DreamLLM cannot condition. Tiny random components from `dreamllm_hf.testing_utils` (LLaMA 2 x 32, CLIP 2 x 16 at
16 px, 4 dream queries)."""

import numpy as np
import pytest
import torch
from test_pipeline import picture, scripted, seeded

from dreamllm_hf import DreamLLMProcessor
from dreamllm_hf.decoder_conditioning import NUM_TIME_IDS
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
from dreamllm_hf.testing_utils import (
    ADDITION_TIME_EMBED_DIM,
    config_token_ids,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_scheduler,
    tiny_unet,
    tiny_vae,
)
from dreamllm_hf.training import DreamLLMTrainingModel


Q, CLIP_SIZE, CLIP_PATCH = 4, 16, 8
POOLED = 16
FAST = dict(num_inference_steps=2, guidance_scale=3.0)

# name -> (UNet kind, the model's cross_attention_dim, its pooled_projection_dim, VAE blocks)
DECODERS = {
    "sd-24": ("sd", 24, None, 2),
    "sd-40": ("sd", 40, None, 2),
    "sdxl": ("sdxl", 32, POOLED, 3),  # a VAE with 4 pixels per latent: 32 px pictures from 8 x 8 latents
    "text": ("text", 32, None, 2),
}


@pytest.fixture(scope="module")
def tokenizer():
    return DreamLLMProcessor.from_pretrained(DEMO_MODEL_PATH / "processor").tokenizer


def config_for(tokenizer, cross_attention_dim: int = 32, pooled_projection_dim: int | None = None):
    """The factory's tiny config on the demo tokenizer, with a 16 px CLIP tower (patch 8) and grouped queries."""
    ids = config_token_ids(tokenizer)
    special = {name: ids[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return tiny_config(
        text_config=dict(vocab_size=len(tokenizer), num_key_value_heads=2, **special),
        vision_config=dict(image_size=CLIP_SIZE, patch_size=CLIP_PATCH),
        num_dream_queries=Q,
        cross_attention_dim=cross_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        **ids,
    )


def mllm_for(tokenizer, cross_attention_dim: int, pooled_projection_dim: int | None = None, seed: int = 0):
    return tiny_model(config_for(tokenizer, cross_attention_dim, pooled_projection_dim), seed=seed)


def processor_for(tokenizer) -> DreamLLMProcessor:
    return tiny_processor(config_for(tokenizer), tokenizer=tokenizer)


def unet_for(name: str):
    kind, width, pooled, _ = DECODERS[name]
    return tiny_unet(kind, cross_attention_dim=width, pooled_projection_dim=pooled)


def build_pipeline(tokenizer, name: str) -> DreamLLMPipeline:
    _, width, pooled, vae_blocks = DECODERS[name]
    pipe = DreamLLMPipeline(
        mllm=mllm_for(tokenizer, width, pooled),
        processor=processor_for(tokenizer),
        unet=unet_for(name),
        vae=tiny_vae(vae_blocks),
        scheduler=tiny_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipelines(tokenizer):
    return {name: build_pipeline(tokenizer, name) for name in DECODERS}


def picture_size(name: str) -> int:
    return {"sd-24": 16, "sd-40": 16, "sdxl": 32, "text": 16}[name]


class UNetInputs:
    """Records what the UNet is called with (its `encoder_hidden_states` and `added_cond_kwargs`)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        self.calls.append((states, kwargs.get("added_cond_kwargs")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def dream_start(pipe) -> int:
    return pipe.mllm.config.dream_start_token_id


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning each decoder


@pytest.mark.parametrize("name", list(DECODERS))
def test_text_to_image_gives_the_decoder_what_it_reads(pipelines, name):
    pipe = pipelines[name]
    t2i = DreamLLMText2ImagePipeline.from_pipe(pipe)
    size = picture_size(name)
    assert t2i._default_size(None, None) == (size, size)  # sample_size x the VAE's scale factor
    kind, width, pooled, _ = DECODERS[name]
    with UNetInputs(pipe.unet) as seen:
        images = t2i(["a red circle", "a blue square"], generator=seeded(), output_type="np", **FAST).images
    assert images.shape == (2, size, size, 3) and np.isfinite(images).all()
    encoder_hidden_states, added = seen.calls[0]
    assert encoder_hidden_states.shape == (4, Q, width)  # [uncond x 2, cond x 2] under guidance
    if kind == "sdxl":
        assert added["text_embeds"].shape == (4, POOLED)
        expected = torch.tensor([[size, size, 0, 0, size, size]] * 4, dtype=added["time_ids"].dtype)
        torch.testing.assert_close(added["time_ids"], expected)
        # the unconditional rows are `<s>` alone: equal to each other, not to the captions
        torch.testing.assert_close(added["text_embeds"][0], added["text_embeds"][1])
        assert not torch.allclose(added["text_embeds"][1], added["text_embeds"][2])
    else:
        assert added is None


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_document_draws_its_picture_with_the_decoder(pipelines, name):
    pipe = pipelines[name]
    size = picture_size(name)
    eos = pipe.mllm.config.eos_token_id
    with UNetInputs(pipe.unet) as seen:
        out = pipe(
            "<image> Tell a story.",
            image=[picture()],
            generation_kwargs=scripted([dream_start(pipe), 5, eos]),
            generator=seeded(),
            output_type="np",
            **FAST,
        )
    assert len(out.images[0]) == 1 and out.images[0][0].shape == (size, size, 3)
    encoder_hidden_states, added = seen.calls[0]
    if DECODERS[name][0] == "sdxl":
        assert added["text_embeds"].shape == (2, POOLED) and added["time_ids"].shape == (2, NUM_TIME_IDS)
        # the document's picture has the pooled conditioning of the same dream block as its sequence conditioning
        text = pipe.format_chat_prompt("<image> Tell a story.")
        inputs = pipe.processor(text=[text], images=[[picture()]], return_tensors="pt")
        context = pipe.mllm.get_dream_embeddings(inputs["input_ids"], pixel_values=inputs["pixel_values"])
        torch.testing.assert_close(encoder_hidden_states[1:], context.dream_embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(added["text_embeds"][1:], context.dream_pooled_embeddings, atol=1e-5, rtol=1e-5)
        # and the unconditional row is `<s>` alone, its pooled part included
        unconditional = pipe._dream_embeddings([""], None, torch.device("cpu"))
        torch.testing.assert_close(encoder_hidden_states[:1], unconditional[0])
        torch.testing.assert_close(added["text_embeds"][:1], unconditional[1])
    else:
        assert added is None


@pytest.mark.parametrize("name", list(DECODERS))
def test_dream_embeddings_shapes(pipelines, name):
    mllm = pipelines[name].mllm
    _, width, pooled, _ = DECODERS[name]
    ids = pipelines[name].processor(
        text=["a red circle", "a much longer caption here"], padding=True, padding_side="left", return_tensors="pt"
    )
    input_ids, mask = ids["input_ids"], ids["attention_mask"]
    assert mask[1].all()  # the second row is the longer one: no padding
    dream = mllm.get_dream_embeddings(input_ids, attention_mask=mask)
    embeds, pooled_embeds = dream.dream_embeddings, dream.dream_pooled_embeddings
    assert embeds.shape == (2, Q, width)
    assert dream.dream_hidden_states.shape == (2, Q, mllm.config.text_config.hidden_size)
    torch.testing.assert_close(embeds, mllm.model.condition_projector(dream.dream_hidden_states))
    if pooled is None:
        assert pooled_embeds is None and mllm.model.pooled_projector is None
        assert not any("pooled" in key for key in mllm.state_dict())
    else:
        assert pooled_embeds.shape == (2, pooled)
        hidden = dream.dream_hidden_states
        torch.testing.assert_close(pooled_embeds, mllm.model.pooled_projector.linear(hidden.mean(dim=1)))
    # the forward over a whole dream block gives the same conditioning, pooled part included
    config = mllm.config
    block = [config.dream_start_token_id] + [config.image_patch_token_id] * Q + [config.dream_end_token_id]
    row = torch.cat([input_ids[1:, :], torch.tensor([block])], dim=1)
    output = mllm(input_ids=row)
    torch.testing.assert_close(output.dream_embeddings, embeds[1:], atol=1e-5, rtol=1e-5)
    if pooled is None:
        assert output.dream_pooled_embeddings is None
    else:
        torch.testing.assert_close(output.dream_pooled_embeddings, pooled_embeds[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd-40", "sdxl"])
def test_save_load_round_trip(pipelines, name, tmp_path):
    pipe = pipelines[name]
    pipe.save_pretrained(tmp_path)
    loaded = DreamLLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.mllm.config.pooled_projection_dim == DECODERS[name][2]
    assert loaded.mllm.state_dict().keys() == pipe.mllm.state_dict().keys()
    if DECODERS[name][2] is not None:
        torch.testing.assert_close(
            loaded.mllm.model.pooled_projector.linear.weight, pipe.mllm.model.pooled_projector.linear.weight
        )
    pictures = [
        DreamLLMText2ImagePipeline.from_pipe(p)("a red circle", generator=seeded(), output_type="np", **FAST).images
        for p in (pipe, loaded)
    ]
    np.testing.assert_array_equal(pictures[0], pictures[1])


def test_sdxl_prompt_embeds_need_their_pooled_embeds(pipelines):
    t2i = DreamLLMText2ImagePipeline.from_pipe(pipelines["sdxl"])
    embeds, negative, pooled, negative_pooled = t2i.encode_prompt("a red circle", torch.device("cpu"), 1, True)
    assert pooled.shape == (1, POOLED) and negative_pooled.shape == (1, POOLED)
    from_prompt = t2i("a red circle", generator=seeded(), output_type="latent", **FAST).images
    from_embeds = t2i(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        generator=seeded(),
        output_type="latent",
        **FAST,
    ).images
    torch.testing.assert_close(from_embeds, from_prompt)
    with pytest.raises(ValueError, match="With `prompt_embeds`, pass `pooled_prompt_embeds` too"):
        t2i(prompt_embeds=embeds, **FAST)
    with pytest.raises(ValueError, match="With `negative_prompt_embeds`, pass `negative_pooled_prompt_embeds`"):
        t2i(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative, **FAST)
    with pytest.raises(ValueError, match=r"`pooled_prompt_embeds` has shape \(1, 3\); expected \(1, 16\)"):
        t2i(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:, :3], **FAST)
    sd = DreamLLMText2ImagePipeline.from_pipe(pipelines["sd-24"])
    with pytest.raises(ValueError, match="this model has no pooled conditioning"):
        sd(prompt_embeds=torch.zeros(1, Q, 24), pooled_prompt_embeds=torch.zeros(1, POOLED), **FAST)


def test_sdxl_float16_vae_decodes_in_float32_as_sdxl_does(tokenizer):
    pipe = build_pipeline(tokenizer, "sdxl")
    pipe.vae.to(torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=seeded())
    assert pipe._decode(latents, None).dtype == torch.float32
    assert pipe.vae.dtype == torch.float16  # put back
    sd = build_pipeline(tokenizer, "sd-24")
    sd.vae.to(torch.float16)
    assert sd._decode(latents, None).dtype == torch.float16  # SD 1/2 pipelines ignore `force_upcast`


def test_a_unet_projecting_its_conditioning_takes_the_model_at_encoder_hid_dim(tokenizer):
    unet = tiny_unet(cross_attention_dim=40, encoder_hid_dim=24)  # `text_proj`: 24 -> 40
    pipe = DreamLLMText2ImagePipeline(
        mllm_for(tokenizer, 24), processor_for(tokenizer), unet, tiny_vae(), tiny_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe("a red circle", generator=seeded(), output_type="np", **FAST).images
    assert drawn.shape == (1, 16, 16, 3)
    # Precomputed conditioning is the model's width (24), not the UNet's attention width (40).
    embeds, negative, _, _ = pipe.encode_prompt("a red circle", torch.device("cpu"), 1, True)
    again = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=seeded(), output_type="np", **FAST)
    np.testing.assert_allclose(again.images, drawn, atol=1e-6)
    with pytest.raises(ValueError, match=r"`prompt_embeds` has shape .*expected \[batch, \d+, 24\]"):
        pipe(prompt_embeds=torch.zeros(1, embeds.shape[1], 40), output_type="np", **FAST)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def training_model(mllm, name: str) -> DreamLLMTrainingModel:
    """`mllm` with the decoder `name` of `DECODERS`, in training mode."""
    vae = tiny_vae(num_blocks=DECODERS[name][3])
    return DreamLLMTrainingModel(mllm, unet_for(name), vae, tiny_scheduler()).train()


@pytest.mark.parametrize("name", ["sd-24", "sdxl", "text"])
def test_a_training_step_reaches_the_dream_queries_and_the_pooled_projector(tokenizer, name):
    _, width, pooled, _ = DECODERS[name]
    mllm = mllm_for(tokenizer, width, pooled).train()
    model = training_model(mllm, name)
    unet = model.unet
    config = mllm.config
    caption = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    block = [config.dream_start_token_id] + [config.image_patch_token_id] * Q + [config.dream_end_token_id]
    input_ids = torch.tensor([[config.bos_token_id, *caption, *block, config.eos_token_id]])
    size = picture_size(name)
    targets = torch.rand(1, 3, size, size, generator=seeded()) * 2 - 1
    seen = UNetInputs(unet)
    out = model(input_ids=input_ids, labels=input_ids, diffusion_pixel_values=targets, generator=seeded())
    seen.handle.remove()
    out.loss.backward()
    assert out.vm_loss > 0
    inner = mllm.model
    for module in (inner.dream_queries, inner.condition_projector):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    added = seen.calls[0][1]
    if pooled is None:
        assert added is None and out.dream_pooled_embeddings is None
    else:
        assert out.dream_pooled_embeddings.shape == (1, pooled)
        torch.testing.assert_close(added["time_ids"], torch.tensor([[size, size, 0, 0, size, size]]).float())
        assert inner.pooled_projector.linear.weight.grad.abs().sum() > 0
        before = inner.pooled_projector.linear.weight.detach().clone()
        torch.optim.SGD(mllm.parameters(), lr=0.1).step()
        assert not torch.equal(inner.pooled_projector.linear.weight, before)


def test_a_batch_without_pictures_keeps_the_pooled_projector_in_the_graph(tokenizer):
    mllm = mllm_for(tokenizer, 32, POOLED).train()
    model = training_model(mllm, "sdxl")
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("a red circle", add_special_tokens=False)["input_ids"]]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert mllm.model.pooled_projector.linear.weight.grad is not None  # a zero gradient, but one (DDP needs it)


def test_lora_trains_the_pooled_projector_in_full_and_saves_it(tokenizer, tmp_path):
    from dreamllm_hf.training import apply_lora

    mllm = apply_lora(mllm_for(tokenizer, 32, POOLED).train(), rank=4, alpha=8, dropout=0.0)
    trained = {name for name, param in mllm.named_parameters() if param.requires_grad and "pooled_projector" in name}
    assert trained and all("modules_to_save" in name for name in trained)
    model = training_model(mllm, "sdxl")
    config = mllm.config
    block = [config.dream_start_token_id] + [config.image_patch_token_id] * Q + [config.dream_end_token_id]
    ids = torch.tensor([[config.bos_token_id, *block]])
    targets = torch.rand(1, 3, 32, 32, generator=seeded()) * 2 - 1
    model(input_ids=ids, diffusion_pixel_values=targets, generator=seeded()).loss.backward()
    grads = [param.grad for name, param in mllm.named_parameters() if name in trained]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)
    mllm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("pooled_projector" in key for key in load_file(tmp_path / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------------
# Decoders DreamLLM cannot condition


UNCONDITIONABLE = {
    "class labels": (dict(class_embed_type="timestep"), "needs `class_labels`"),
    "class embeddings": (dict(num_class_embeds=10), "needs `class_labels`"),
    "image additions": (dict(addition_embed_type="image", encoder_hid_dim=32), "'image' needs `image_embeds`"),
    "image projection": (dict(encoder_hid_dim_type="image_proj", encoder_hid_dim=32), "'image_proj' needs"),
    "guidance embedding": (dict(time_cond_proj_dim=8), "time_cond_proj_dim=8 needs a guidance embedding"),
    "inpainting": (dict(in_channels=9), "takes 9 input channels but the VAE gives 4-channel latents"),
}


@pytest.mark.parametrize("case", list(UNCONDITIONABLE))
def test_a_decoder_that_cannot_be_conditioned_is_refused_at_construction(tokenizer, case):
    config, message = UNCONDITIONABLE[case]
    unet = tiny_unet(cross_attention_dim=32, **config)
    mllm, processor, vae = mllm_for(tokenizer, 32), processor_for(tokenizer), tiny_vae()
    for pipeline_class in (DreamLLMPipeline, DreamLLMText2ImagePipeline):
        with pytest.raises(ValueError, match=f"cannot be conditioned by this DreamLLM model: .*{message}"):
            pipeline_class(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=tiny_scheduler())
    with pytest.raises(ValueError, match=message):
        DreamLLMTrainingModel(mllm, unet, vae, tiny_scheduler())


MISMATCHES = {
    "width": (
        lambda tok: (mllm_for(tok, 24), tiny_unet(cross_attention_dim=40)),
        "takes 40-dim conditioning \\(cross_attention_dim\\) but the DreamLLM model gives 24-dim",
    ),
    "no pooled projector": (
        lambda tok: (mllm_for(tok, 32), tiny_unet("sdxl", cross_attention_dim=32, pooled_projection_dim=POOLED)),
        f"reads a pooled `text_embeds` of size {POOLED} .*set pooled_projection_dim={POOLED}",
    ),
    "pooled width": (
        lambda tok: (mllm_for(tok, 32, 12), tiny_unet("sdxl", cross_attention_dim=32, pooled_projection_dim=POOLED)),
        f"size {POOLED} \\(projection_class_embeddings_input_dim {POOLED + NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM}.*gives 12",
    ),
    "pooled projector, no pooled input": (
        lambda tok: (mllm_for(tok, 32, POOLED), tiny_unet(cross_attention_dim=32)),
        "has a pooled projector \\(pooled_projection_dim=16\\) but the UNet reads no pooled",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatched_decoder_is_refused_naming_both_sides(tokenizer, case):
    build, message = MISMATCHES[case]
    mllm, unet = build(tokenizer)
    with pytest.raises(ValueError, match=message):
        DreamLLMText2ImagePipeline(mllm, processor_for(tokenizer), unet, tiny_vae(), tiny_scheduler())


def test_a_mismatched_decoder_is_refused_at_loading(pipelines, tmp_path):
    pipelines["sd-24"].save_pretrained(tmp_path)
    tiny_unet(cross_attention_dim=40).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="takes 40-dim conditioning .* gives 24-dim"):
        DreamLLMPipeline.from_pretrained(tmp_path)
