"""Loading DreamLLM in fp16, bf16, 8-bit and 4-bit (bitsandbytes runs both on this CPU), and where precision is kept."""

import pytest
import torch
from transformers import BitsAndBytesConfig

from dreamllm_hf import DreamLLMForConditionalGeneration
from dreamllm_hf.testing_utils import tiny_config, tiny_model


bnb = pytest.importorskip("bitsandbytes")

FULL_PRECISION = ("model.multi_modal_projector", "model.condition_projector", "lm_head")


def quantizable_config():
    # bitsandbytes on AVX512-BF16 CPUs needs in_features % 64 == 0 and out_features % 32 == 0 for 4-bit layers.
    return tiny_config(
        text_config=dict(hidden_size=64, intermediate_size=128),
        vision_config=dict(hidden_size=64, intermediate_size=128),
        cross_attention_dim=32,
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_model(quantizable_config())
    path = tmp_path_factory.mktemp("quant") / "mllm"
    model.save_pretrained(path)
    return model, path


def inputs():
    config = quantizable_config()
    image_block = [config.image_start_token_id, *[config.image_patch_token_id] * config.num_image_tokens]
    ids = torch.tensor([[config.bos_token_id, 5, 6, *image_block, config.image_end_token_id, 7, 8]])
    size = config.vision_config.image_size
    return ids, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "quantization, layer_class, tolerance",
    [
        # Observed on this tiny random model: 4-bit NF4 max |Δlogit| 0.071, 8-bit 0.007 (logits up to ~0.7).
        (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            "Linear4bit",
            0.15,
        ),
        (BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt", 0.02),
    ],
    ids=["nf4", "int8"],
)
def test_quantized_layers_exactly_where_intended(saved_model, quantization, layer_class, tolerance):
    reference, path = saved_model
    model = DreamLLMForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization, dtype=torch.float32
    )
    linear = {
        name: type(module).__name__ for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    for name, kind in linear.items():
        expected = "Linear" if name in FULL_PRECISION else layer_class
        assert kind == expected, f"{name} is {kind}, expected {expected}"
    assert sum(kind == layer_class for kind in linear.values()) == len(linear) - len(FULL_PRECISION)
    assert model.model.dream_queries.weight.dtype == torch.float32
    torch.testing.assert_close(model.model.dream_queries.weight, reference.model.dream_queries.weight)
    ids, pixels = inputs()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        actual = model(input_ids=ids, pixel_values=pixels).logits
        diff = (actual - expected).abs().max().item()
    assert 0 < diff <= tolerance
    cond = model.get_dream_embeddings(ids[:, :3]).dream_embeddings
    assert cond.shape == (1, 3, 32) and torch.isfinite(cond).all()


def test_4bit_checkpoint_saves_and_reloads(saved_model, tmp_path):
    _, path = saved_model
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = DreamLLMForConditionalGeneration.from_pretrained(
        path, quantization_config=quantization, dtype=torch.float32
    )
    model.save_pretrained(tmp_path / "nf4")
    reloaded = DreamLLMForConditionalGeneration.from_pretrained(tmp_path / "nf4", dtype=torch.float32)
    assert type(reloaded.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids, pixels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits
        )


def test_fp16_load_keeps_learned_glue_in_fp32(saved_model):
    _, path = saved_model
    model = DreamLLMForConditionalGeneration.from_pretrained(path, dtype=torch.float16)
    # LLaMA's own output layer follows the dtype asked for, as in LlamaForCausalLM (README, "Fitting it on your GPU").
    assert model.lm_head.weight.dtype == torch.float16
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float16
    for module in (model.model.multi_modal_projector, model.model.condition_projector, model.model.dream_queries):
        assert module.weight.dtype == torch.float32


def test_bf16_on_cpu_end_to_end(saved_model):
    reference, path = saved_model
    model = DreamLLMForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, pixels = inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        cond = model.get_dream_embeddings(ids[:, :3]).dream_embeddings
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max().item() < 0.02
    assert cond.dtype == torch.bfloat16
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_device_map_split_runs_with_offload(saved_model, tmp_path):
    """A memory budget forces a split across CPU and disk, at module boundaries `_no_split_modules` allows."""
    from accelerate import infer_auto_device_map, init_empty_weights

    reference, path = saved_model
    with init_empty_weights():
        empty = DreamLLMForConditionalGeneration(quantizable_config())
    budget = {"cpu": int(empty.get_memory_footprint() * 0.6), "disk": 10**9}
    device_map = infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=empty._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}
    assert not any(".layers." in name and name.count(".") > 4 for name in device_map)  # layers kept whole
    model = DreamLLMForConditionalGeneration.from_pretrained(
        path, device_map=device_map, offload_folder=tmp_path
    ).eval()
    assert model.hf_device_map == device_map
    ids, pixels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=pixels).logits, reference(input_ids=ids, pixel_values=pixels).logits
        )
        torch.testing.assert_close(
            model.get_dream_embeddings(ids[:, :3]).dream_embeddings,
            reference.get_dream_embeddings(ids[:, :3]).dream_embeddings,
        )
