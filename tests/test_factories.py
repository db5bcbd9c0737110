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


def test_every_public_name_comes_from_one_module_and_is_exported():
    import dreamllm_hf.testing_utils as testing_utils
    from dreamllm_hf.testing_utils import backbones, decoders, factories

    modules = (backbones, decoders, factories)
    names = [name for module in modules for name in module.__all__]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
    assert sorted(testing_utils.__all__) == sorted(names)
    for module in modules:
        public = {name for name, value in vars(module).items() if callable(value) and not name.startswith("_")}
        defined_here = {name for name in public if getattr(vars(module)[name], "__module__", None) == module.__name__}
        assert defined_here <= set(module.__all__), defined_here - set(module.__all__)  # nothing left out
        for name in module.__all__:
            assert getattr(testing_utils, name) is getattr(module, name), name  # nothing shadowed


def test_one_unet_builder_for_every_kind():
    from dreamllm_hf.decoder_conditioning import NUM_TIME_IDS
    from dreamllm_hf.testing_utils import (
        ADDITION_TIME_EMBED_DIM,
        DECODER_KINDS,
        TINY_POOLED_PROJECTION_DIM,
        tiny_diffusion,
        tiny_unet,
        tiny_vae,
    )

    unets = {kind: tiny_unet(kind, cross_attention_dim=24) for kind in DECODER_KINDS}
    assert all(unet.config.cross_attention_dim == 24 for unet in unets.values())
    assert [unets[kind].config.addition_embed_type for kind in DECODER_KINDS] == [None, "text_time", "text"]
    width = unets["sdxl"].config.projection_class_embeddings_input_dim
    assert width == TINY_POOLED_PROJECTION_DIM + NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM
    assert tiny_unet("sdxl", pooled_projection_dim=12).config.projection_class_embeddings_input_dim == width - 4
    with pytest.raises(ValueError, match="Unknown `kind` 'xl'"):
        tiny_unet("xl")
    with pytest.raises(ValueError, match="`pooled_projection_dim` is 12, but a 'sd' UNet reads no pooled"):
        tiny_unet("sd", pooled_projection_dim=12)
    with pytest.raises(ValueError, match="`num_blocks` must be a positive int; got 0"):
        tiny_vae(0)
    # the VAE's sample size is the UNet's latents times its factor, for any number of blocks
    for blocks in (2, 3):
        vae = tiny_vae(blocks)
        assert vae.config.sample_size == unets["sd"].config.sample_size * 2 ** (blocks - 1)
    parts = tiny_diffusion("sd", cross_attention_dim=24, seed=3)
    assert torch.equal(parts["unet"].conv_in.weight, tiny_unet(cross_attention_dim=24, seed=3).conv_in.weight)
    assert torch.equal(parts["vae"].encoder.conv_in.weight, tiny_vae(seed=3).encoder.conv_in.weight)
