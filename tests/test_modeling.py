"""Behaviour of DreamLLMConfig / DreamLLMModel / DreamLLMForConditionalGeneration on tiny random models."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.cache_utils import DynamicCache

import dreamllm_hf  # noqa: F401  (registers the Auto classes)
from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMModel
from dreamllm_hf import constants as C


N_IMG, Q = 4, 3  # image tokens (28 px / patch 14) and dream queries of the tiny model
BOS, EOS, PAD = 1, 2, 100
IM_START, IM_PATCH, IM_END, DREAM_START, DREAM_END = 101, 102, 103, 104, 105


def tiny_config(**overrides) -> DreamLLMConfig:
    kwargs = dict(
        text_config=dict(
            model_type="llama",
            vocab_size=108,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        num_dream_queries=Q,
        cross_attention_dim=8,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        image_start_token_id=IM_START,
        image_patch_token_id=IM_PATCH,
        image_end_token_id=IM_END,
        dream_start_token_id=DREAM_START,
        dream_end_token_id=DREAM_END,
        image_token_id=106,
        dream_token_id=107,
    )
    kwargs.update(overrides)
    return DreamLLMConfig(**kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DreamLLMForConditionalGeneration(tiny_config()).eval()


def image_block():
    return [IM_START] + [IM_PATCH] * N_IMG + [IM_END]


def dream_block():
    return [DREAM_START] + [IM_PATCH] * Q + [DREAM_END]


def pixels(n, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_default_config_is_the_released_7b():
    config = DreamLLMConfig()
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (
        32008,
        4096,
        32,
        11008,
    )
    assert (text.rms_norm_eps, text.max_position_embeddings, text.tie_word_embeddings) == (1e-6, 2048, False)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 224, 14)
    assert vision.hidden_act == "quick_gelu"
    assert (config.num_image_tokens, config.num_dream_queries, config.cross_attention_dim) == (256, 64, 1024)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 32000)
    assert config.vision_feature_layer == -2
    for token, token_id in C.RELEASE_ADDED_TOKEN_IDS.items():
        assert config.special_token_ids[token] == token_id


def test_auto_classes_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DreamLLMConfig)
    ids = torch.tensor([[BOS, 5, 6] + image_block() + [7, 8]])
    expected = model(input_ids=ids, pixel_values=pixels(1)).logits
    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is DreamLLMForConditionalGeneration
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels(1)).logits, expected)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert type(backbone) is DreamLLMModel
    torch.testing.assert_close(backbone.dream_queries.weight, model.model.dream_queries.weight)


def test_image_features_go_after_im_start_not_on_every_patch(model):
    """Dream slots use <im_patch> too: they must get the queries, never image features."""
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6]])
    out_a = model(input_ids=ids, pixel_values=pixels(1, seed=1))
    out_b = model(input_ids=ids, pixel_values=pixels(1, seed=2))
    # The dream block comes before the image: a different image cannot change its conditioning.
    torch.testing.assert_close(out_a.dream_embeddings, out_b.dream_embeddings)
    assert not torch.allclose(out_a.logits[:, -1], out_b.logits[:, -1])
    # Teacher forcing and the two-pass inference path agree (the original's consistency check).
    two_pass = model.get_dream_embeddings(torch.tensor([[BOS, 5]]))
    torch.testing.assert_close(out_a.dream_embeddings, two_pass, atol=1e-5, rtol=1e-5)


def test_dream_outputs_for_every_block_in_reading_order(model):
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6, 7] + dream_block() + image_block() + [EOS]])
    out = model(input_ids=ids, pixel_values=pixels(2))
    assert out.dream_hidden_states.shape == (2, Q, 32)
    assert out.dream_embeddings.shape == (2, Q, 8)
    first = model.get_dream_embeddings(torch.tensor([[BOS, 5]]))
    torch.testing.assert_close(out.dream_embeddings[:1], first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.dream_embeddings[0], out.dream_embeddings[1])


def test_loss_is_zero_not_nan_when_every_label_is_ignored(model):
    ids = torch.tensor([[BOS, 5, 6] + dream_block() + [EOS]])
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits[1:], labels[0, 2:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_loss_flows_into_queries_and_projectors(model):
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6, EOS]])
    out = model(input_ids=ids, pixel_values=pixels(1), labels=ids)
    (out.loss + out.dream_embeddings.square().mean()).backward()
    for param in (
        model.model.dream_queries.weight,
        model.model.condition_projector.weight,
        model.model.multi_modal_projector.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_image_count_mismatch_is_a_clear_error(model):
    ids = torch.tensor([[BOS] + image_block() + [5] + image_block()])
    with pytest.raises(ValueError, match=r"2 image block\(s\).*1 image\(s\)"):
        model(input_ids=ids, pixel_values=pixels(1))
    with pytest.raises(ValueError, match=r"2 image block\(s\).*0 image\(s\)"):
        model(input_ids=ids)


def test_cut_off_blocks_are_clear_errors(model):
    with pytest.raises(ValueError, match="dream block is cut off"):
        model(input_ids=torch.tensor([[BOS, 5, DREAM_START, IM_PATCH]]))
    with pytest.raises(ValueError, match="image block is cut off"):
        model(input_ids=torch.tensor([[BOS, 5, IM_START, IM_PATCH]]), pixel_values=pixels(1))


def test_dream_embeddings_continue_a_cache_without_recomputing(model):
    context = torch.tensor([[BOS, 5, 6, 7] + image_block() + [8]])
    direct = model.get_dream_embeddings(context, pixel_values=pixels(1))
    cache = DynamicCache(config=model.config.text_config)
    model(input_ids=context, pixel_values=pixels(1), cache=cache, use_cache=True)
    assert cache.get_seq_length() == context.shape[1]
    continued = model.get_dream_embeddings(context[:, :0], cache=cache)
    torch.testing.assert_close(continued, direct, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == context.shape[1] + Q + 2


def test_generate_uses_cache_and_runs_vision_once(model):
    ids = torch.tensor([[BOS, 5] + image_block() + [6, 7]])
    calls = []
    hook = model.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))  # once a pass
    try:
        cached = model.generate(input_ids=ids, pixel_values=pixels(1), max_new_tokens=6, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 1  # the original ran a dummy CLIP pass at every decode step
    uncached = model.generate(
        input_ids=ids, pixel_values=pixels(1), max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_batched_left_padding_generates_as_one_by_one(model):
    prompts = [[BOS, 5] + image_block() + [6, 7, 8, 9], [BOS] + image_block() + [10]]
    images = pixels(2)
    singles = [
        model.generate(input_ids=torch.tensor([p]), pixel_values=images[i : i + 1], max_new_tokens=5, do_sample=False)[
            0, len(p) :
        ]
        for i, p in enumerate(prompts)
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=5, do_sample=False, pad_token_id=PAD
    )
    for row, single in zip(batched[:, width:], singles):
        assert torch.equal(row, single)


def test_static_cache_decode_compiles_as_one_graph(model):
    # What `generate(cache_implementation="static")` does on a GPU: compile the decode step. A graph break (e.g. from
    # reading the static cache's on-device length) would cost a sync per token and the CUDA graph.
    from transformers import CompileConfig

    ids = torch.tensor([[BOS, 5] + image_block() + [6, 7]])
    expected = model.generate(input_ids=ids, pixel_values=pixels(1), max_new_tokens=6, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(
        input_ids=ids,
        pixel_values=pixels(1),
        max_new_tokens=6,
        do_sample=False,
        cache_implementation="static",
        compile_config=compile_config,
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled, expected)


def test_dream_queries_live_in_a_module(model):
    assert isinstance(model.model.dream_queries, torch.nn.Module)
    names = dict(model.named_parameters())
    assert "model.dream_queries.weight" in names
    assert names["model.dream_queries.weight"].shape == (Q, 32)
