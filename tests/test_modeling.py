"""Behaviour of DreamLLMConfig / DreamLLMModel / DreamLLMForConditionalGeneration on tiny random models (the checks
every model is held to, save/load, dict vs tuple, batching, generation, compiled decode, are in test_contracts.py)."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMModel
from dreamllm_hf import constants as C
from dreamllm_hf.testing_utils import tiny_config, tiny_model


CONFIG = tiny_config()
N_IMG, Q = CONFIG.num_image_tokens, CONFIG.num_dream_queries
HIDDEN = CONFIG.text_config.hidden_size
BOS, EOS = CONFIG.bos_token_id, CONFIG.eos_token_id
IM_START, IM_PATCH, IM_END = CONFIG.image_start_token_id, CONFIG.image_patch_token_id, CONFIG.image_end_token_id
DREAM_START, DREAM_END = CONFIG.dream_start_token_id, CONFIG.dream_end_token_id


@pytest.fixture(scope="module")
def model():
    return tiny_model(CONFIG)


def image_block():
    return [IM_START] + [IM_PATCH] * N_IMG + [IM_END]


def dream_block():
    return [DREAM_START] + [IM_PATCH] * Q + [DREAM_END]


def pixels(n, seed=0):
    size = CONFIG.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


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


def test_image_features_go_after_im_start_not_on_every_patch(model):
    """Dream slots use <im_patch> too: they must get the queries, never image features."""
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6]])
    out_a = model(input_ids=ids, pixel_values=pixels(1, seed=1))
    out_b = model(input_ids=ids, pixel_values=pixels(1, seed=2))
    # The dream block comes before the image: a different image cannot change its conditioning.
    torch.testing.assert_close(out_a.dream_embeddings, out_b.dream_embeddings)
    assert not torch.allclose(out_a.logits[:, -1], out_b.logits[:, -1])
    # Teacher forcing and the two-pass inference path agree (the original's consistency check).
    two_pass = model.get_dream_embeddings(torch.tensor([[BOS, 5]])).dream_embeddings
    torch.testing.assert_close(out_a.dream_embeddings, two_pass, atol=1e-5, rtol=1e-5)


def test_dream_outputs_for_every_block_in_reading_order(model):
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6, 7] + dream_block() + image_block() + [EOS]])
    out = model(input_ids=ids, pixel_values=pixels(2))
    assert out.dream_hidden_states.shape == (2, Q, HIDDEN)
    assert out.dream_embeddings.shape == (2, Q, CONFIG.cross_attention_dim)
    first = model.get_dream_embeddings(torch.tensor([[BOS, 5]])).dream_embeddings
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
    direct = model.get_dream_embeddings(context, pixel_values=pixels(1)).dream_embeddings
    cache = DynamicCache(config=model.config.text_config)
    model(input_ids=context, pixel_values=pixels(1), cache=cache, use_cache=True)
    assert cache.get_seq_length() == context.shape[1]
    continued = model.get_dream_embeddings(context[:, :0], cache=cache).dream_embeddings
    torch.testing.assert_close(continued, direct, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == context.shape[1] + Q + 2


def test_dream_queries_live_in_a_module(model):
    assert isinstance(model.model.dream_queries, torch.nn.Module)
    names = dict(model.named_parameters())
    assert "model.dream_queries.weight" in names
    assert names["model.dream_queries.weight"].shape == (Q, HIDDEN)


# ----------------------------------------------------------------------------------------------------------------------
# transformers' conventions: dict vs tuple, the `cache` argument, what the base class does for us


def test_config_return_dict_false_gives_a_tuple(model):
    """The contract layer checks `return_dict=False`; a composite config's `return_dict` must work the same way."""
    ids = torch.tensor([[BOS, 5] + dream_block() + image_block() + [6, EOS]])
    # `config.return_dict=False` on the composite config turns the outer output into a tuple; the language model
    # inside still hands back a ModelOutput (its own config is untouched).
    model.config.return_dict = False
    try:
        out = model(input_ids=ids, pixel_values=pixels(1))
    finally:
        model.config.return_dict = True
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], model(input_ids=ids, pixel_values=pixels(1)).logits)


def test_outputs_build_on_the_library_multimodal_outputs(model):
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast

    from dreamllm_hf.modeling import DreamLLMCausalLMOutputWithPast, DreamLLMModelOutputWithPast

    assert issubclass(DreamLLMModelOutputWithPast, MultimodalBaseModelOutputWithPast)
    assert issubclass(DreamLLMCausalLMOutputWithPast, MultimodalCausalLMOutputWithPast)
    ids = torch.tensor([[BOS, 5] + image_block() + [6] + dream_block()])
    out = model(input_ids=ids, pixel_values=pixels(1))
    torch.testing.assert_close(out.image_outputs.pooler_output, model.get_image_features(pixels(1)).pooler_output)
    assert (
        out.dream_embeddings.shape == (1, Q, CONFIG.cross_attention_dim) and out.cache.get_seq_length() == ids.shape[1]
    )
    text_only = model(input_ids=torch.tensor([[BOS, 5, 6]]))
    assert text_only.image_outputs is None and text_only.dream_embeddings is None


def test_past_key_values_is_a_deprecated_alias_of_cache(model):
    context = torch.tensor([[BOS, 5, 6] + image_block() + [7]])
    step = torch.tensor([[8]])
    reference = DynamicCache(config=model.config.text_config)
    model(input_ids=context, pixel_values=pixels(1), cache=reference, use_cache=True)
    expected = model(input_ids=step, cache=reference).logits
    old = DynamicCache(config=model.config.text_config)
    for module in (model, model.model):
        with pytest.warns(FutureWarning, match=r"`past_key_values` is deprecated.*Use `cache` instead"):
            module(input_ids=context, pixel_values=pixels(1), past_key_values=old, use_cache=True)
        assert old.get_seq_length() == context.shape[1]
        old = DynamicCache(config=model.config.text_config)
    model(input_ids=context, pixel_values=pixels(1), cache=old, use_cache=True)
    with pytest.warns(FutureWarning, match="Use `cache` instead"):
        got = model(input_ids=step, past_key_values=old).logits
    torch.testing.assert_close(got, expected)
    with pytest.warns(FutureWarning, match="Use `cache` instead"):
        continued = model.get_dream_embeddings(step[:, :0], past_key_values=old).dream_embeddings
    assert old.get_seq_length() == context.shape[1] + 1 + Q + 2  # the step, then the dream block
    fresh = model.get_dream_embeddings(torch.cat([context, step], 1), pixel_values=pixels(1)).dream_embeddings
    torch.testing.assert_close(continued, fresh, atol=1e-5, rtol=0)


def test_what_the_base_class_does_is_not_repeated(model, tmp_path):
    from dreamllm_hf import DreamLLMPreTrainedModel

    # `config_class` comes from the `config: DreamLLMConfig` annotation (`PreTrainedModel.__init_subclass__`).
    for cls in (DreamLLMPreTrainedModel, DreamLLMModel, DreamLLMForConditionalGeneration):
        assert cls.config_class is DreamLLMConfig
    # Embeddings are found by `PreTrainedModel` through `base_model_prefix` and `language_model`.
    for cls in (DreamLLMModel, DreamLLMForConditionalGeneration):
        for name in ("get_input_embeddings", "set_input_embeddings", "get_output_embeddings", "set_output_embeddings"):
            assert name not in cls.__dict__, f"{cls.__name__}.{name} repeats the base class"
    embed_tokens = model.model.language_model.embed_tokens
    assert model.get_input_embeddings() is embed_tokens and model.model.get_input_embeddings() is embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    fresh = DreamLLMForConditionalGeneration(CONFIG)
    replacement = torch.nn.Embedding(CONFIG.text_config.vocab_size, HIDDEN)
    fresh.set_input_embeddings(replacement)
    assert fresh.model.language_model.embed_tokens is replacement
    # `_no_split_modules` is collected from the sub-models when the model is built.
    assert "_no_split_modules" not in DreamLLMPreTrainedModel.__dict__
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)
    assert model._can_compile_fullgraph  # the decode step compiles as one graph: see the compiled-decode test
    # device_map="auto" splits at those boundaries: a memory budget sends the last layers to disk, each one whole.
    model.save_pretrained(tmp_path / "model")
    budget = {"cpu": int(model.get_memory_footprint() * 0.6), "disk": 10**9}
    placed = DreamLLMForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory=budget, offload_folder=tmp_path / "offload"
    ).eval()
    assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
    assert not any(".layers." in name and name.count(".") > 4 for name in placed.hf_device_map)
    ids = torch.tensor([[BOS, 5] + image_block() + [6]])
    torch.testing.assert_close(
        placed(input_ids=ids, pixel_values=pixels(1)).logits, model(input_ids=ids, pixel_values=pixels(1)).logits
    )


def test_config_docstring_has_one_entry_per_argument_with_the_true_defaults():
    import re

    doc = DreamLLMConfig.__doc__
    entries = dict(re.findall(r"^\s{8}(\w+) (\(.*?\)):$", doc, re.M))
    fields = {"text_config", "vision_config"} | {
        name for name in DreamLLMConfig.__annotations__ if name not in ("text_config", "vision_config")
    }
    assert set(entries) == fields
    config = DreamLLMConfig()
    defaults = {name: re.search(r"defaults to `?([^`)]+)`?\)", kind) for name, kind in entries.items()}
    assert sum(match is not None for match in defaults.values()) == len(fields) - 2  # all but the sub-configs
    for name, match in defaults.items():
        if match:
            assert match.group(1) == str(getattr(config, name)), name
