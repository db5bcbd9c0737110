"""UNet LoRAs in diffusers' format on the pipelines that draw: a LoRA trained here with peft on the tiny UNet, saved as
diffusers' training scripts save one, changes the pictures of both pipelines; `set_adapters` to 0, fusing and
unloading behave as in diffusers, and unloading gives back the base UNet bit for bit."""

import copy
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_pipeline import FAST, load_pipeline, scripted, seeded

from dreamllm_hf.pipelines import (
    DreamLLMImg2ImgPipeline,
    DreamLLMInpaintPipeline,
    DreamLLMPipeline,
    DreamLLMText2ImagePipeline,
)
from dreamllm_hf.pipelines.lora_loading import DreamLLMLoraLoaderMixin


peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def train_lora(unet, steps=4, seed=0):
    """A copy of `unet` with a rank-4 LoRA (alpha 8: a scale of 2, which the saved metadata must carry) trained for a
    few Adam steps on the denoising loss, as diffusers' `train_text_to_image_lora.py` trains one."""
    from diffusers import DDPMScheduler

    unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    assert params and all(p.requires_grad for n, p in unet.named_parameters() if "lora" in n)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    for _ in range(steps):
        latents = torch.randn(2, unet.config.in_channels, size, size, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        condition = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, condition).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval()


@pytest.fixture(scope="module")
def lora(converted_tiny, tmp_path_factory):
    """(folder of the saved LoRA, the trained UNet it came from)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    trained = train_lora(load_pipeline(converted_tiny).unet)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    assert all(v.abs().max() > 0 for k, v in layers.items() if "lora_B" in k or "lora.up" in k)  # trained, not B = 0
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        weight_name=WEIGHT_NAME,
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    return folder, trained


@pytest.fixture
def t2i(converted_tiny):
    return DreamLLMText2ImagePipeline.from_pipe(load_pipeline(converted_tiny))


def draw(pipe):
    return pipe("a red bird", generator=seeded(), output_type="pt", **FAST).images


def unet_inputs(unet):
    g = torch.Generator().manual_seed(1)
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    return latents, torch.tensor([500]), torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)


def test_every_drawing_pipeline_takes_diffusers_stable_diffusion_lora_loader():
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    for cls in (DreamLLMPipeline, DreamLLMText2ImagePipeline, DreamLLMImg2ImgPipeline, DreamLLMInpaintPipeline):
        assert issubclass(cls, DreamLLMLoraLoaderMixin) and issubclass(cls, StableDiffusionLoraLoaderMixin)
        assert cls._lora_loadable_modules == ["unet"]  # never the mllm


def test_load_set_adapters_fuse_unfuse_unload(t2i, lora):
    folder, trained = lora
    base = draw(t2i)
    base_state = {k: v.clone() for k, v in t2i.unet.state_dict().items()}

    t2i.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name="style")
    assert t2i.get_list_adapters() == {"unet": ["style"]} and t2i.get_active_adapters() == ["style"]
    # The loaded adapter is the trained one, its alpha/r scale included.
    with torch.no_grad():
        torch.testing.assert_close(t2i.unet(*unet_inputs(t2i.unet)).sample, trained(*unet_inputs(trained)).sample)
    with_lora = draw(t2i)
    assert (with_lora - base).abs().max() > 1e-3

    t2i.set_adapters(["style"], [0.0])
    assert torch.equal(draw(t2i), base)
    t2i.set_adapters("style", 0.5)
    half = draw(t2i)
    assert not torch.equal(half, base) and not torch.equal(half, with_lora)
    t2i.set_adapters(["style"], [1.0])
    assert torch.equal(draw(t2i), with_lora)

    t2i.fuse_lora()
    assert t2i.num_fused_loras == 1 and t2i.fused_loras == {"style"}
    torch.testing.assert_close(draw(t2i), with_lora, atol=1e-5, rtol=0)
    t2i.unfuse_lora()
    assert t2i.num_fused_loras == 0
    t2i.unload_lora_weights()

    assert t2i.get_list_adapters() == {}
    state = t2i.unet.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert torch.equal(draw(t2i), base)


def test_unloading_a_fused_lora_keeps_it_in_the_weights(t2i, lora):
    """diffusers' way to bake a LoRA in: fuse, then unload; the copies kept for `unfuse_lora` go with the LoRA."""
    from dreamllm_hf.pipelines.lora_loading import WEIGHTS_BEFORE_FUSING

    folder, _ = lora
    base = draw(t2i)
    t2i.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name="style")
    t2i.set_adapters("style", 0.5)
    half = draw(t2i)
    t2i.set_adapters("style", 1.0)
    t2i.fuse_lora(lora_scale=0.5)
    assert getattr(t2i.unet, WEIGHTS_BEFORE_FUSING)
    t2i.unload_lora_weights()
    assert not hasattr(t2i.unet, WEIGHTS_BEFORE_FUSING) and t2i.get_list_adapters() == {}
    baked = draw(t2i)
    torch.testing.assert_close(baked, half, atol=1e-5, rtol=0)
    assert (baked - base).abs().max() > 1e-3


def test_a_lora_on_the_document_pipeline_draws_the_documents_pictures(converted_tiny, lora):
    folder, _ = lora
    pipe = load_pipeline(converted_tiny)

    def document_picture():
        out = pipe(
            "Tell a story", generation_kwargs=scripted([5, 1003, 2]), generator=seeded(5), output_type="np", **FAST
        )
        return out.images[0][0]

    base = document_picture()  # builds the writer's text-to-image pipeline before the LoRA comes
    pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name="style")
    assert DreamLLMText2ImagePipeline.from_pipe(pipe).get_list_adapters() == {"unet": ["style"]}  # one shared unet
    assert np.abs(document_picture() - base).max() > 1e-3
    pipe.unload_lora_weights()
    assert np.array_equal(document_picture(), base)


def test_text_encoder_keys_are_left_out_with_a_warning(t2i, lora, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, _ = lora
    with safe_open(folder / WEIGHT_NAME, "pt") as saved:  # the file with a CLIP text-encoder part added
        tensors, metadata = {k: saved.get_tensor(k) for k in saved.keys()}, saved.metadata()
    prefix = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors |= {f"{prefix}.lora_A.weight": torch.ones(4, 32), f"{prefix}.lora_B.weight": torch.ones(32, 4)}
    save_file(tensors, tmp_path / WEIGHT_NAME, metadata=metadata)
    mllm_state = {k: v.clone() for k, v in t2i.mllm.state_dict().items()}

    with caplog.at_level(logging.WARNING, logger="dreamllm_hf.pipelines.lora_loading"):
        t2i.load_lora_weights(tmp_path, weight_name=WEIGHT_NAME, adapter_name="mixed")
    assert "Left out the 2 text-encoder keys" in caplog.text
    assert t2i.get_list_adapters() == {"unet": ["mixed"]}
    assert not any("lora" in name for name, _ in t2i.mllm.named_parameters())
    assert all(torch.equal(v, mllm_state[k]) for k, v in t2i.mllm.state_dict().items())
    # The UNet part is loaded as from the file alone.
    with_mixed = draw(t2i)
    t2i.unload_lora_weights()
    t2i.load_lora_weights(folder, weight_name=WEIGHT_NAME)
    assert torch.equal(draw(t2i), with_mixed)


def test_refusals_say_why(converted_tiny, lora):
    folder, _ = lora
    pipe = load_pipeline(converted_tiny)
    with pytest.raises(ValueError, match="no UNet weights .* text-encoder keys only"):
        pipe.load_lora_weights({"text_encoder.q_proj.lora_A.weight": torch.ones(4, 32)})
    with pytest.raises(ValueError, match="every key of a LoRA state dict has `lora`"):
        pipe.load_lora_weights({"unet.conv_in.weight": torch.ones(4, 4)})
    text_only = DreamLLMPipeline(mllm=pipe.mllm, processor=pipe.processor)
    with pytest.raises(ValueError, match="DreamLLMPipeline has no `unet`"):
        text_only.load_lora_weights(folder, weight_name=WEIGHT_NAME)
    with pytest.raises(ValueError, match="text_encoder is not found"):
        pipe.fuse_lora(components=["text_encoder"])
