"""The tiny-component factory of `dreamllm_hf.testing_utils` that every test and benchmark builds from."""

import pytest
import torch

from dreamllm_hf.testing_utils import (
    TINY_TEXT_CONFIG,
    config_token_ids,
    tiny_config,
    tiny_model,
    tiny_pipeline_components,
    tiny_tokenizer,
)


def test_the_config_carries_the_ids_of_the_tokenizer_it_is_not_built_from():
    tokenizer = tiny_tokenizer()
    assert config_token_ids(tokenizer) == config_token_ids()
    config = tiny_config()
    assert config.text_config.vocab_size == len(tokenizer)
    vocab = tokenizer.get_vocab()
    assert config.special_token_ids == {token: vocab[token] for token in config.special_token_ids}


def test_overrides_merge_into_the_tiny_sub_configs():
    config = tiny_config(text_config={"hidden_size": 64}, vision_config={"image_size": 56}, num_dream_queries=5)
    assert config.text_config.hidden_size == 64
    assert config.text_config.num_hidden_layers == TINY_TEXT_CONFIG["num_hidden_layers"]  # the rest stays tiny
    assert (config.num_image_tokens, config.num_dream_queries) == (16, 5)
    with pytest.raises(ValueError, match="Give `config` or config overrides, not both"):
        tiny_model(config, num_dream_queries=2)


def test_models_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second, other = tiny_model(), tiny_model(), tiny_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [m.model.dream_queries.weight for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_pipeline_components_fit_each_other():
    components = tiny_pipeline_components(num_dream_queries=5)
    mllm, processor, unet = components["mllm"], components["processor"], components["unet"]
    assert processor.num_dream_queries == mllm.config.num_dream_queries == 5
    assert processor.num_image_tokens == mllm.config.num_image_tokens
    assert unet.config.cross_attention_dim == mllm.config.cross_attention_dim
    ids = config_token_ids(processor.tokenizer)
    assert all(getattr(mllm.config, name) == value for name, value in ids.items())
