"""The converted fixture checkpoint against the ORIGINAL code's goldens (fp32, CPU).

Sizes, ids and inputs are read from goldens.json, so the same tests hold for any checkpoint of that layout.
"""

import pytest
import torch


ATOL = 1e-4  # fp32 reduction-order noise on these sizes is ~3e-6 (fixtures README)
LOSS_RTOL = 1e-5


def _images(spec, goldens):
    """The fixture's textual image spec (e.g. "pixel_values[:2]") resolved to tensors."""
    pixel_values = goldens["pixel_values"]
    table = {
        None: None,
        "pixel_values[:1]": pixel_values[:1],
        "pixel_values[:2]": pixel_values[:2],
        "stack([pixel_values[1], pixel_values[0]])": torch.stack([pixel_values[1], pixel_values[0]]),
    }
    return table[spec]


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.float() - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def test_converted_config_has_real_ids(tiny_mllm, goldens_json):
    ids = goldens_json["ids"]
    config = tiny_mllm.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert tiny_mllm.generation_config.eos_token_id == ids["eos"]
    assert config.text_config.vocab_size == goldens_json["vocab_size"]
    assert config.num_image_tokens == goldens_json["num_image_tokens"]
    assert config.num_dream_queries == goldens_json["num_dream_queries"]
    for token in ("<im_start>", "<im_patch>", "<im_end>", "<dream_start>", "<dream_end>", "<image>", "<dream>"):
        assert config.special_token_ids[token] == ids[token]


@torch.no_grad()
def test_clip_features(tiny_mllm, goldens):
    hidden = tiny_mllm.model.vision_tower(goldens["pixel_values"], output_hidden_states=True).hidden_states
    assert_close(hidden[tiny_mllm.config.vision_feature_layer], goldens["clip_hidden_states_select_layer"])
    assert_close(
        tiny_mllm.get_image_features(goldens["pixel_values"]).pooler_output, goldens["clip_projected_features"]
    )


@pytest.mark.parametrize("name", ["comp_one_image", "comp_two_images", "comp_text_only", "comp_batch2"])
@torch.no_grad()
def test_comprehension_logits(tiny_mllm, goldens, goldens_json, name):
    case = goldens_json["comprehension"][name]
    out = tiny_mllm(input_ids=torch.tensor(case["input_ids"]), pixel_values=_images(case["images"], goldens))
    assert_close(out.logits, goldens[f"{name}_logits"])


@torch.no_grad()
def test_dream_block_embeddings(tiny_mllm, goldens):
    assert_close(tiny_mllm.model.dream_block_embeddings(1), goldens["dream_queries_with_special_tokens"])


@pytest.mark.parametrize(
    "ids_key, golden",
    [("prompt_input_ids", "cond_"), ("negative_input_ids", "cond_negative_")],
)
@torch.no_grad()
def test_creation_conditioning(tiny_mllm, goldens, goldens_json, ids_key, golden):
    input_ids = torch.tensor([goldens_json["creation"][ids_key]])
    dream = tiny_mllm.get_dream_embeddings(input_ids)
    assert_close(dream.dream_hidden_states, goldens[f"{golden}prompt_embeds"])
    assert_close(dream.dream_embeddings, goldens[f"{golden}encoder_hidden_states"])


@torch.no_grad()
def test_creation_conditioning_batched_with_left_padding(tiny_mllm, goldens, goldens_json):
    """Prompt and empty negative in one left-padded batch give each row's own conditioning (the original can't)."""
    prompt = goldens_json["creation"]["prompt_input_ids"]
    negative = goldens_json["creation"]["negative_input_ids"]
    pad = goldens_json["ids"]["pad"]
    width = max(len(prompt), len(negative))
    rows = [[pad] * (width - len(ids)) + ids for ids in (negative, prompt)]
    mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in (negative, prompt)]
    embeds = tiny_mllm.get_dream_embeddings(torch.tensor(rows), attention_mask=torch.tensor(mask)).dream_embeddings
    assert_close(embeds[:1], goldens["cond_negative_encoder_hidden_states"])
    assert_close(embeds[1:], goldens["cond_encoder_hidden_states"])


@pytest.mark.parametrize(
    "name", ["train_interleaved_1img", "train_interleaved_2img", "train_t2i_pair", "train_i2t_pair"]
)
@torch.no_grad()
def test_teacher_forced_training_forward(tiny_mllm, goldens, goldens_json, name):
    sample = goldens_json["training"]["samples"][name]
    tiny_mllm.train()
    try:
        out = tiny_mllm(
            input_ids=torch.tensor(sample["input_ids"]),
            pixel_values=_images(sample["images"], goldens),
            labels=torch.tensor(sample["labels"]),
        )
    finally:
        tiny_mllm.eval()
    assert_close(out.logits, goldens[f"{name}_logits"])
    assert out.loss.item() == pytest.approx(sample["lm_loss"], rel=LOSS_RTOL, abs=1e-7)
    if f"{name}_dream_hidden_states" in goldens:
        assert_close(out.dream_hidden_states, goldens[f"{name}_dream_hidden_states"])
        assert_close(out.dream_embeddings, goldens[f"{name}_unet_encoder_hidden_states"])
    else:
        assert out.dream_hidden_states is None


@pytest.mark.parametrize("index", range(5))
def test_converted_tokenizer_matches_original_ids(converted_tiny, goldens_json, index):
    from dreamllm_hf import DreamLLMProcessor

    case = goldens_json["tokenization"][index]
    tokenizer = DreamLLMProcessor.from_pretrained(converted_tiny / "processor").tokenizer
    assert tokenizer(case["text"])["input_ids"] == case["input_ids"]
    assert tokenizer.convert_ids_to_tokens(case["input_ids"]) == case["tokens"]
    assert len(tokenizer) == goldens_json["tokenizer_len"]


def test_t2i_prompt_tokenization(converted_tiny, goldens_json):
    from dreamllm_hf import DreamLLMProcessor

    processor = DreamLLMProcessor.from_pretrained(converted_tiny / "processor")
    creation = goldens_json["creation"]
    assert processor(text=creation["prompt"])["input_ids"] == [creation["prompt_input_ids"]]
    assert processor(text=creation["negative_prompt"])["input_ids"] == [creation["negative_input_ids"]]
