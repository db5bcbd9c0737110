"""DreamLLM on other backbones: built by `dreamllm-hf init` from tiny Llama, Qwen2, Mistral, Gemma 2 and Gemma 3 LLMs,
CLIP and SigLIP towers (`dreamllm_hf.testing_utils.backbones`) and SD-like and SDXL-like decoders
(`testing_utils.decoders`), then run, saved, trained.

Every LLM x tower x decoder combination is built once (module scope) from saved folders through the CLI, and the per-combination
tests share it; tests that change a model work on a copy.
"""

import copy
import json
import re

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline import CollectStreamer, LogitsRecorder, Script, written_stream
from transformers import AutoModelForCausalLM, AutoProcessor, LogitsProcessor, LogitsProcessorList

from dreamllm_hf import constants as C
from dreamllm_hf.building import build_dreamllm
from dreamllm_hf.cli import main
from dreamllm_hf.decoder_conditioning import pooled_width
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline, StopReason
from dreamllm_hf.testing_utils import backbones as B
from dreamllm_hf.testing_utils import save_tiny_diffusion, tiny_diffusion


Q = 3  # dream queries of the built models
FAST = dict(num_inference_steps=2, guidance_scale=2.0)
DECODERS = ("sd", "sdxl")  # an SD 1.x/2.x-like UNet, and an SDXL-like one that also reads a pooled conditioning
COMBINATIONS = [
    (llm, vision, decoder) for llm in B.LLM_FAMILIES for vision in B.VISION_FAMILIES for decoder in DECODERS
]
FULL_VISION_MODEL = {"clip": False, "siglip": True}  # SigLIP is saved as a whole model: its vision part is taken


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Every part saved once, as `dreamllm-hf init` reads them."""
    root = tmp_path_factory.mktemp("parts")
    return {
        "llm": {family: B.save_tiny_llm(family, root / "llm" / family) for family in B.LLM_FAMILIES},
        "vision": {
            family: B.save_tiny_vision(family, root / "vision" / family, full=FULL_VISION_MODEL[family])
            for family in B.VISION_FAMILIES
        },
        "diffusion": {kind: save_tiny_diffusion(root / kind, kind=kind) for kind in DECODERS},
    }


@pytest.fixture(scope="module")
def built(parts, tmp_path_factory):
    """`(folder, pipeline)` of a combination: written by `dreamllm-hf init`, loaded back (cached)."""
    root, cache = tmp_path_factory.mktemp("built"), {}

    def get(llm: str, vision: str, decoder: str = "sd"):
        if (llm, vision, decoder) not in cache:
            folder = root / f"{llm}-{vision}-{decoder}"
            argv = ["init", "--llm", str(parts["llm"][llm]), "--vision", str(parts["vision"][vision])]
            argv += ["--diffusion", str(parts["diffusion"][decoder]), "--num-dream-queries", str(Q)]
            assert main([*argv, "--output", str(folder)]) == 0
            pipe = DreamLLMPipeline.from_pretrained(folder, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            cache[llm, vision, decoder] = folder, pipe
        return cache[llm, vision, decoder]

    return get


def picture(seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def text_tokens(pipe, count=4) -> list[int]:
    """Ids of a few ordinary text tokens (not special) of the built model's tokenizer."""
    tokenizer = pipe.tokenizer
    ids = tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    return [i for i in ids if i not in tokenizer.all_special_ids][:count]


# ---------------------------------------------------------------------------------------------------------------------
# Every combination


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_init_writes_a_pipeline_folder_that_says_what_it_is(built, parts, llm, vision, decoder):
    folder, pipe = built(llm, vision, decoder)
    config, tokenizer = pipe.mllm.config, pipe.tokenizer
    index = json.loads((folder / "model_index.json").read_text())
    assert index["mllm"] == ["dreamllm_hf.modeling.modeling_dreamllm", "DreamLLMForConditionalGeneration"]
    card = (folder / "README.md").read_text()
    assert "untrained" in card and str(parts["llm"][llm]) in card and str(parts["vision"][vision]) in card
    record = json.loads((folder / "building.json").read_text())
    assert record["llm_type"] == config.text_config.model_type and record["vision_type"] == f"{vision}_vision_model"
    # The format's ids are the tokenizer's, wherever they landed; the sizes come from the parts.
    vocab = tokenizer.get_vocab()
    for token, token_id in config.special_token_ids.items():
        if token not in (C.BOS_TOKEN, C.EOS_TOKEN, C.PAD_TOKEN):  # the LLM's own, checked below
            assert vocab[token] == token_id, token
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.pad_token_id not in (None, config.eos_token_id)
    assert max(vocab.values()) < config.text_config.vocab_size == pipe.mllm.get_input_embeddings().weight.shape[0]
    assert config.num_image_tokens == pipe.processor.num_image_tokens == (B.VISION_IMAGE_SIZE[vision] // 14) ** 2
    assert config.cross_attention_dim == pipe.unet.config.cross_attention_dim and config.num_dream_queries == Q
    # An SDXL-like decoder also reads a pooled conditioning: the config's size is what its UNet takes besides the time ids.
    pooled = pooled_width(pipe.unet.config)
    assert config.pooled_projection_dim == pooled and (pooled is None) == (decoder == "sd")


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_forward_with_pictures_and_dream_embeddings(built, llm, vision, decoder):
    _, pipe = built(llm, vision, decoder)
    mllm, processor = pipe.mllm, pipe.processor
    inputs = processor(text="a story <dream> with <image> end", images=[picture(1), picture(2)], return_tensors="pt")
    with torch.no_grad():
        out = mllm(**inputs)
        other = mllm(
            **processor(text="a story <dream> with <image> end", images=[picture(1), picture(3)], return_tensors="pt")
        )
    assert out.logits.shape == (*inputs["input_ids"].shape, mllm.config.text_config.vocab_size)
    assert out.dream_embeddings.shape == (1, Q, pipe.unet.config.cross_attention_dim)
    # The second picture changes what comes after it, never the dream block before it.
    torch.testing.assert_close(other.dream_embeddings, out.dream_embeddings)
    assert not torch.allclose(other.logits[0, -1], out.logits[0, -1])
    # Teacher forcing and the two-pass path (`get_dream_embeddings` after the context) agree.
    context = processor(text="a story ", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        two_pass = mllm.get_dream_embeddings(context)
    torch.testing.assert_close(two_pass.dream_embeddings, out.dream_embeddings, atol=1e-5, rtol=1e-5)
    if decoder == "sdxl":
        assert out.dream_pooled_embeddings.shape == (1, mllm.config.pooled_projection_dim)
        torch.testing.assert_close(two_pass.dream_pooled_embeddings, out.dream_pooled_embeddings, atol=1e-5, rtol=1e-5)
    else:
        assert out.dream_pooled_embeddings is None


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_pipeline_text_picture_and_document(built, llm, vision, decoder):
    _, pipe = built(llm, vision, decoder)
    config = pipe.mllm.config
    # Text: the pipeline's answer is `generate` on the LLM's own chat template.
    answer = pipe("<image>What is it?", image=picture(), allow_images=False, max_new_tokens=4)
    chat = pipe.format_chat_prompt("<image>What is it?")
    inputs = pipe.processor(text=chat, images=[picture()], return_tensors="pt")
    never = [config.image_start_token_id, config.image_patch_token_id, config.image_end_token_id]
    never += [config.dream_end_token_id, config.image_token_id, config.dream_token_id, config.pad_token_id]
    generated = pipe.mllm.generate(
        **inputs, max_new_tokens=4, do_sample=False, suppress_tokens=never + [config.dream_start_token_id]
    )
    expected = pipe.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.text == [expected if expected.strip() else ""]  # a document keeps no blank text
    # Picture: text-to-image on the same components, reproducible from its generator.
    text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)
    first = text2image("a red circle", generator=seeded(0), output_type="np", **FAST).images
    again = text2image("a red circle", generator=seeded(0), output_type="np", **FAST).images
    assert first.shape == (1, 16, 16, 3) and np.array_equal(first, again)
    # Document: text, a picture where the model asks for one, text, the end.
    a, b = text_tokens(pipe, 2)
    script = [a, config.dream_start_token_id, b, config.eos_token_id]
    document = pipe(
        "Tell me a story.",
        generation_kwargs={"logits_processor": LogitsProcessorList([Script(script)])},
        generator=seeded(0),
        output_type="np",
        **FAST,
    )
    assert document.stop_reasons == [StopReason.EOS] and len(document.images[0]) == 1
    assert [isinstance(part, str) for part in document.documents[0]] == [True, False, True]


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_save_load_round_trip(built, llm, vision, decoder, tmp_path):
    _, pipe = built(llm, vision, decoder)
    pipe.save_pretrained(tmp_path)
    loaded = DreamLLMPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    saved, reloaded = pipe.mllm.state_dict(), loaded.mllm.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[key], reloaded[key]) for key in saved)
    tied = pipe.mllm.config.tie_word_embeddings
    assert (loaded.mllm.lm_head.weight is loaded.mllm.get_input_embeddings().weight) == tied
    assert loaded.processor.chat_template == pipe.processor.chat_template
    inputs = pipe.processor(text="<image> hello", images=[picture()], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.mllm(**inputs).logits, pipe.mllm(**inputs).logits)


def training_batch(pipe) -> dict:
    """One interleaved sample: text, a drawn picture (dream block + its read-back), a read picture, text."""
    processor, config = pipe.processor, pipe.mllm.config
    inputs = processor(
        text="a story <dream> and <image> the end", images=[picture(1), picture(2)], return_tensors="pt"
    )
    labels = inputs["input_ids"].clone()
    blocks = [config.image_patch_token_id, config.image_start_token_id, config.image_end_token_id]
    labels[torch.isin(labels, torch.tensor(blocks + [config.dream_end_token_id]))] = -100
    target = torch.rand(1, 3, 16, 16, generator=seeded(5)) * 2 - 1
    return {**inputs, "labels": labels, "diffusion_pixel_values": target}


def train_one_step(pipe, mllm) -> dict:
    """One optimizer step of the DreamLLM loss (lm + 10 x diffusion); returns the parameters before it."""
    from dreamllm_hf.training import DreamLLMTrainingModel

    model = DreamLLMTrainingModel(mllm, pipe.unet, pipe.vae, pipe.scheduler).train()
    trainable = {name: p for name, p in mllm.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1e-2)
    out = model(**training_batch(pipe), generator=seeded(0))
    assert torch.isfinite(out.loss) and out.lm_loss > 0 and out.vm_loss > 0
    out.loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_full_training_step(built, llm, vision, decoder):
    _, pipe = built(llm, vision, decoder)
    mllm = copy.deepcopy(pipe.mllm)
    mllm.model.vision_tower.requires_grad_(False)
    before = train_one_step(pipe, mllm)
    after = dict(mllm.named_parameters())
    tied = mllm.config.tie_word_embeddings
    head = "model.language_model.embed_tokens.weight" if tied else "lm_head.weight"  # one name for a tied pair
    trained = ["model.dream_queries.weight", "model.condition_projector.weight", "model.multi_modal_projector.weight"]
    if decoder == "sdxl":
        trained.append("model.pooled_projector.linear.weight")
    for name in trained:
        assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before[head], after[head])
    assert any(not torch.equal(before[n], after[n]) for n in before if ".language_model.layers." in n)
    assert (mllm.lm_head.weight is mllm.get_input_embeddings().weight) == mllm.config.tie_word_embeddings


@pytest.mark.parametrize("llm, vision, decoder", COMBINATIONS)
def test_lora_training_step(built, llm, vision, decoder):
    from dreamllm_hf.training import apply_lora

    _, pipe = built(llm, vision, decoder)
    peft_model = apply_lora(copy.deepcopy(pipe.mllm), rank=2, alpha=4, dropout=0.0)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(lora_layers) == 7 * pipe.mllm.config.text_config.num_hidden_layers
    assert all(".language_model.layers." in name for name in lora_layers)
    before = train_one_step(pipe, peft_model)
    after = dict(peft_model.named_parameters())
    assert any("lora_B" in n and not torch.equal(before[n], after[n]) for n in before)
    assert any("dream_queries" in n and not torch.equal(before[n], after[n]) for n in before)
    frozen = [n for n, p in peft_model.named_parameters() if ".self_attn.q_proj.base_layer." in n]
    assert frozen and not any(after[n].requires_grad for n in frozen)


# ---------------------------------------------------------------------------------------------------------------------
# The language model


@pytest.mark.parametrize("llm", B.LLM_FAMILIES)
def test_the_llm_computes_what_it_did_before(built, parts, llm):
    """On text, the DreamLLM gives the LLM's own logits for every token it knew (its soft-capping, its embedding
    scale, its windows); a new token's output row starts as the mean known row."""
    _, pipe = built(llm, "clip")
    original = AutoModelForCausalLM.from_pretrained(parts["llm"][llm], dtype=torch.float32).eval()
    known = len(B.tiny_llm_tokenizer(llm))  # Qwen's spare rows after them now hold the format's tokens
    ids = pipe.processor(text="the quick brown fox jumps over the lazy dog " * 2, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > B.SLIDING_WINDOW  # past the window of the sliding families
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        logits = pipe.mllm(input_ids=ids).logits
    torch.testing.assert_close(logits[..., :known], expected[..., :known], atol=1e-5, rtol=1e-5)
    known_rows = original.get_input_embeddings().weight[:known]
    for token_id in (pipe.mllm.config.dream_start_token_id, pipe.mllm.config.image_token_id):
        row = pipe.mllm.get_input_embeddings().weight[token_id]
        torch.testing.assert_close(row, known_rows.mean(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("llm", ["llama", "gemma2", "gemma3"])
def test_queries_and_image_features_live_where_token_embeddings_do(built, llm):
    """A dream query equal to a token's embedding (as the LLM's layers read it: after Gemma's sqrt(hidden) scaling)
    is that token to the LLM; so is an image feature. Neither is scaled again."""
    _, pipe = built(llm, "clip")
    mllm, config = copy.deepcopy(pipe.mllm), pipe.mllm.config
    token = text_tokens(pipe, 1)[0]
    embedded = mllm.get_input_embeddings()(torch.tensor([token])).detach()
    with torch.no_grad():
        mllm.model.dream_queries.weight.copy_(embedded.expand(Q, -1))
        mllm.model.multi_modal_projector.weight.zero_()
        mllm.model.multi_modal_projector.bias.copy_(embedded[0])
    prefix = pipe.processor(text="a b", return_tensors="pt")["input_ids"][0].tolist()
    dream = [config.dream_start_token_id] + [config.image_patch_token_id] * Q + [config.dream_end_token_id]
    image = [config.image_start_token_id] + [config.image_patch_token_id] * config.num_image_tokens
    image += [config.image_end_token_id]
    with_blocks = torch.tensor([prefix + dream + image])
    # The same sequence with the token in every slot, given as embeddings (so that no block is filled).
    as_tokens = torch.tensor(
        [prefix + [dream[0]] + [token] * Q + [dream[-1]] + [image[0]] + [token] * (len(image) - 2) + [image[-1]]]
    )
    pixels = pipe.processor.image_processor(picture(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        as_embeddings = mllm.get_input_embeddings()(as_tokens)
        torch.testing.assert_close(
            mllm(input_ids=with_blocks, pixel_values=pixels).logits, mllm(inputs_embeds=as_embeddings).logits
        )


@pytest.mark.parametrize("llm", ["qwen2", "gemma2", "gemma3"])
def test_tied_embeddings_stay_tied(parts, llm):
    """An LLM that ties its output to its input embeddings keeps them tied: built (through the resize), resized
    again, and saved and loaded (one tensor on disk)."""
    from safetensors import safe_open

    original = AutoModelForCausalLM.from_pretrained(parts["llm"][llm])
    assert original.config.tie_word_embeddings
    pipe = DreamLLMPipeline.from_components(parts["llm"][llm], parts["vision"]["clip"], parts["diffusion"]["sd"])
    mllm = pipe.mllm
    assert mllm.config.tie_word_embeddings and mllm.lm_head.weight is mllm.get_input_embeddings().weight
    mllm.resize_token_embeddings(mllm.config.text_config.vocab_size + 3)
    assert mllm.lm_head.weight is mllm.get_input_embeddings().weight
    assert mllm.lm_head.weight.shape[0] == mllm.config.text_config.vocab_size
    pipe.save_pretrained(parts["diffusion"]["sd"].parent / f"tied-{llm}")
    weights = parts["diffusion"]["sd"].parent / f"tied-{llm}" / "mllm" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = DreamLLMPipeline.from_pretrained(weights.parent.parent).mllm
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_tokens_land_in_spare_rows_or_new_ones(built):
    """Qwen keeps unused rows at the end of its embeddings: the format's tokens take them (no resize). Llama's matrix
    is exactly its vocabulary: it grows by the tokens added, [PAD] among them (Llama 3 has no pad token)."""
    _, qwen = built("qwen2", "clip")
    qwen_tokens = len(B.tiny_llm_tokenizer("qwen2"))
    assert (
        qwen.mllm.config.text_config.vocab_size == B.tiny_llm_config("qwen2", B.tiny_llm_tokenizer("qwen2")).vocab_size
    )
    assert qwen.mllm.config.image_start_token_id >= qwen_tokens and qwen.mllm.config.bos_token_id is None
    assert qwen.tokenizer.pad_token == "<|endoftext|>"  # its own, distinct from its end of turn
    _, llama = built("llama", "clip")
    added = len(C.RELEASE_ADDED_TOKEN_IDS)  # the 7 format tokens and [PAD]
    assert llama.mllm.config.text_config.vocab_size == len(B.tiny_llm_tokenizer("llama")) + added
    assert llama.tokenizer.pad_token == C.PAD_TOKEN


def test_chat_templates_are_the_llms_own_with_dreamllm_pictures(built):
    conversation = [
        {"role": "user", "content": [picture(), "What is it?"]},
        {"role": "assistant", "content": ["A story.", picture(1)]},
        {"role": "user", "content": "More."},
    ]
    _, qwen = built("qwen2", "clip")
    text, pictures = qwen.chat_prompt_and_images(conversation)
    assert text == (
        "<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\nA story.<dream><|im_end|>\n"
        "<|im_start|>user\nMore.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(pictures) == 2
    _, gemma = built("gemma3", "siglip")
    text, _ = gemma.chat_prompt_and_images("Hi <image>", image=[picture()])
    assert text.startswith("<bos><start_of_turn>user\nHi <image><end_of_turn>")
    ids = gemma.processor(text=text, images=[picture()])["input_ids"][0]
    assert ids[0] == gemma.tokenizer.bos_token_id != ids[1]  # the template's BOS, not a second one


# ---------------------------------------------------------------------------------------------------------------------
# The vision tower


@pytest.mark.parametrize("vision", B.VISION_FAMILIES)
@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_the_features_are_the_hidden_state_the_tower_gives_for_the_layer_read(built, vision, layer):
    """The features are the tower's hidden state `vision_feature_layer` (patch tokens only: CLIP's CLS dropped), from
    the tower's own forward (each layer once), which keeps that hidden state only."""
    _, pipe = built("llama", vision)
    mllm = copy.deepcopy(pipe.mllm)
    mllm.config.vision_feature_layer = layer
    tower = mllm.model.vision_tower
    pixels = pipe.processor.image_processor([picture(0), picture(1)], return_tensors="pt")["pixel_values"]
    calls = []
    hooks = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(tower.encoder.layers)]
    with torch.no_grad():
        output = mllm.get_image_features(pixels)
    for hook in hooks:
        hook.remove()
    assert calls == list(range(len(tower.encoder.layers)))
    kept = [index for index, state in enumerate(output.hidden_states) if state is not None]
    assert kept == [layer % (len(tower.encoder.layers) + 1)]
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[layer]
    patches = hidden[:, 1:] if vision == "clip" else hidden
    features = output.pooler_output
    assert features.shape == (2, mllm.config.num_image_tokens, mllm.config.text_config.hidden_size)
    torch.testing.assert_close(features, mllm.model.multi_modal_projector(patches), rtol=0, atol=0)


def test_a_full_clip_model_gives_its_vision_part(parts, tmp_path):
    folder = B.save_tiny_vision("clip", tmp_path / "full-clip", full=True)
    full_mllm, _, _ = build_dreamllm(parts["llm"]["llama"], folder, cross_attention_dim=8, num_dream_queries=Q)
    from transformers import CLIPModel

    expected = CLIPModel.from_pretrained(folder).vision_model.state_dict()
    tower = full_mllm.model.vision_tower.state_dict()
    assert tower.keys() == expected.keys() and all(torch.equal(tower[k], expected[k]) for k in tower)


# ---------------------------------------------------------------------------------------------------------------------
# Sliding windows in the document engine


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("llm", B.SLIDING_FAMILIES)
def test_documents_past_the_sliding_window_are_what_one_forward_computes(built, llm, cache_implementation):
    """The engine moves rows of a cache whose sliding layers hold only their last columns; a document much longer
    than the window, pictures and all, gets at every sampled token the logits of one uncached forward over it."""
    _, pipe = built(llm, "clip")
    config = pipe.mllm.config
    a, b, c = text_tokens(pipe, 3)
    script = [a, config.dream_start_token_id, b, c, config.dream_start_token_id, a, config.eos_token_id]
    tokens, logits = CollectStreamer(), LogitsRecorder()
    out = pipe(
        "Tell <image> a story.",
        image=[picture(3)],
        streamer=tokens,
        generation_kwargs={"logits_processor": LogitsProcessorList([logits, Script(script)])},
        generator=seeded(0),
        cache_implementation=cache_implementation,
        **FAST,
    )
    assert out.stop_reasons == [StopReason.EOS] and len(out.images[0]) == 2
    stream, chosen_at = written_stream(pipe, tokens)
    assert len(stream) > 3 * config.get_text_config().sliding_window
    pixels = pipe.processor.image_processor([picture(3), *out.images[0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        rebuilt = pipe.mllm(input_ids=torch.tensor([stream]), pixel_values=pixels).logits[0]
    assert len(logits.steps) == len(chosen_at) == len(script)
    for position, recorded in zip(chosen_at, logits.steps):
        kept = torch.isfinite(recorded)
        torch.testing.assert_close(rebuilt[position][kept], recorded[kept], rtol=0, atol=1e-4)


class SmallVocabulary(LogitsProcessor):
    """Sampling among a few text tokens, `<dream_start>` and the end (stateless, per row)."""

    def __init__(self, tokens):
        self.allowed = torch.tensor(tokens)

    def __call__(self, input_ids, scores):
        kept = torch.full_like(scores, -float("inf"))
        kept[:, self.allowed] = scores[:, self.allowed]
        return kept


@pytest.mark.parametrize("llm", B.SLIDING_FAMILIES)
def test_sliding_window_documents_in_a_batch_equal_each_alone(built, llm):
    """Prompts of very different lengths (read in groups), documents drawing at different steps (rows rewritten,
    the cache grown on the left) and finishing at different steps (rows released): each is what it is alone."""
    _, pipe = built(llm, "siglip")
    config = pipe.mllm.config
    vocabulary = SmallVocabulary(text_tokens(pipe, 3) + [config.dream_start_token_id, config.eos_token_id])
    kwargs = dict(
        generation_kwargs={"logits_processor": LogitsProcessorList([vocabulary])},
        do_sample=True,
        max_new_tokens=10,
        max_images=2,
        output_type="np",
        **FAST,
    )
    prompts = ["Hi", "Tell me a story about the quick brown fox and the lazy dog, please, with pictures", "A <image>"]
    images = [[], [], [picture(4)]]
    batch = pipe(prompts, image=images, generator=[seeded(10 + i) for i in range(3)], **kwargs)
    assert max(len(p) for p in batch.images) > 0 and len({len(t) for t in batch.text}) > 1
    for index, prompt in enumerate(prompts):
        single = pipe(prompt, image=images[index] or None, generator=[seeded(10 + index)], **kwargs)
        assert single.text[0] == batch.text[index] and single.stop_reasons[0] == batch.stop_reasons[index]
        assert len(single.images[0]) == len(batch.images[index])
        for ours, alone in zip(batch.images[index], single.images[0]):
            np.testing.assert_allclose(ours, alone, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Bad parts


def test_bad_parts_are_clear_errors(parts, tmp_path, capsys):
    llm, vision, diffusion = parts["llm"]["llama"], parts["vision"]["clip"], parts["diffusion"]["sd"]
    with pytest.raises(ValueError, match="CLIP or SigLIP vision tower"):
        build_dreamllm(llm, llm, cross_attention_dim=8)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        build_dreamllm(vision, vision, cross_attention_dim=8)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_dreamllm(tmp_path / "missing", vision, cross_attention_dim=8)
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no vae/, scheduler/"):
        DreamLLMPipeline.from_components(llm, vision, tmp_path / "sd")
    with pytest.raises(ValueError, match="`eos_token` is '<nope>'"):
        build_dreamllm(llm, vision, cross_attention_dim=8, eos_token="<nope>")
    with pytest.raises(ValueError, match="`vision_feature_layer` is -4, but the vision tower has 2 layers"):
        build_dreamllm(llm, vision, cross_attention_dim=8, vision_feature_layer=-4)
    _, small = B.tiny_vision("siglip")
    small.size = {"height": 28, "width": 28}
    model, _ = B.tiny_vision("siglip")
    with pytest.raises(ValueError, match="image processor gives 28x28 pictures but the vision tower takes 42x42"):
        build_dreamllm(llm, model, image_processor=small, cross_attention_dim=8)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    argv = ["init", "--llm", str(llm), "--vision", str(vision), "--diffusion", str(diffusion)]
    with pytest.raises(FileExistsError, match="not empty"):
        main(argv + ["--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # The command line: a bad number or a part that does not fit is argparse's one-line error, exit code 2.
    for extra, message in (
        (["--num-dream-queries", "0"], "argument --num-dream-queries: .*positive integer"),
        (["--seed", "-1"], "argument --seed: "),
        (["--dtype", "float64"], "argument --dtype: invalid choice"),
        (["--vision-feature-layer", "-4"], "`vision_feature_layer` is -4, but the vision tower has 2 layers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--output", str(tmp_path / "bad"), *extra])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), extra
    assert not (tmp_path / "bad").exists()


def test_eos_token_can_be_the_chat_turn_end(parts):
    mllm, processor, _ = build_dreamllm(
        parts["llm"]["gemma2"], parts["vision"]["clip"], cross_attention_dim=8, eos_token="<end_of_turn>"
    )
    assert mllm.config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert mllm.generation_config.eos_token_id == mllm.config.eos_token_id


def test_from_components_in_python_equals_init_from_folders(built):
    """`DreamLLMPipeline.from_components` on models in memory builds what `dreamllm-hf init` wrote from their folders."""
    _, from_folders = built("gemma3", "siglip")
    llm, tokenizer = B.tiny_llm("gemma3")
    vision, image_processor = B.tiny_vision("siglip", full=FULL_VISION_MODEL["siglip"])
    pipe = DreamLLMPipeline.from_components(
        llm, vision, tiny_diffusion(), tokenizer=tokenizer, image_processor=image_processor, num_dream_queries=Q
    )
    ours, theirs = pipe.mllm.state_dict(), from_folders.mllm.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config, expected = pipe.mllm.config, from_folders.mllm.config
    assert (
        config.special_token_ids == expected.special_token_ids and config.num_image_tokens == expected.num_image_tokens
    )
    assert config.text_config.vocab_size == expected.text_config.vocab_size
    assert pipe.tokenizer.get_vocab() == from_folders.tokenizer.get_vocab()


def test_a_multimodal_gemma3_gives_its_language_model():
    """Of a Gemma 3 vision-language checkpoint only the language model (and its tied head) is taken."""
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    tokenizer = B.tiny_llm_tokenizer("gemma3")
    siglip = dict(model_type="siglip_vision_model", image_size=28, **B.TINY_VISION_SIZES)
    config = AutoConfig.for_model(
        "gemma3",
        text_config=B.tiny_llm_config("gemma3", tokenizer).to_dict(),
        vision_config=siglip,
        mm_tokens_per_image=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    )
    torch.manual_seed(0)
    gemma = Gemma3ForConditionalGeneration(config).eval()
    known = len(tokenizer)
    ids = tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = gemma(input_ids=ids).logits
    vision, image_processor = B.tiny_vision("clip")
    mllm, _, info = build_dreamllm(
        gemma, vision, tokenizer=tokenizer, image_processor=image_processor, cross_attention_dim=8, num_dream_queries=Q
    )
    assert info.llm_type == "gemma3_text" and mllm.lm_head.weight is mllm.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(mllm(input_ids=ids).logits[..., :known], expected[..., :known])


def test_an_llm_without_a_chat_template_gets_the_releases_ended_by_its_own_eos():
    llm, tokenizer = B.tiny_llm("mistral")
    tokenizer.chat_template = None  # a base model (Llama 2, Mistral base)
    vision, image_processor = B.tiny_vision("clip")
    _, processor, info = build_dreamllm(
        llm, vision, tokenizer=tokenizer, image_processor=image_processor, cross_attention_dim=8, num_dream_queries=Q
    )
    assert info.chat_template == "vicuna" and processor.chat_template == C.vicuna_chat_template("</s>")
    text = processor.apply_chat_template(
        [{"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "<dream>"}], tokenize=False
    )
    assert text.endswith("USER: Hi <image> ASSISTANT:<dream></s>")


# ---------------------------------------------------------------------------------------------------------------------
# The paper's three stages through `dreamllm-hf train` on a built model


@pytest.mark.parametrize("llm, vision, decoder", [("qwen2", "siglip", "sdxl"), ("gemma2", "clip", "sd")])
def test_three_stages_through_the_trainer_on_a_built_model(built, llm, vision, decoder, tmp_path):
    """Stage I (the LLM frozen), II (in full, documents + pairs) and III (conversations) with the command line, each
    stage's output the next one's `--model`. Qwen2 has no `<s>`: no sample may carry one (or a `None`)."""
    from dreamllm_hf.shapes_world.data import write_conversations_folder, write_pairs_folder, write_stories_folder
    from dreamllm_hf.training import DreamLLMSampleBuilder, load_data_source

    folder, pipe = built(llm, vision, decoder)
    pairs = write_pairs_folder(tmp_path / "pairs", 4, seed=0, image_size=20)
    stories = write_stories_folder(tmp_path / "stories", 2, seed=0, image_size=20, pictures=(1, 2))
    chats = write_conversations_folder(tmp_path / "chats", 2, seed=0, image_size=20, pictures=(1, 1))
    builder = DreamLLMSampleBuilder(pipe.processor, diffusion_resolution=16)
    rng = np.random.default_rng(0)
    samples = [builder.image_to_text(picture(), "a red circle"), builder.text_to_image(picture(), "a red circle", rng)]
    samples.append(
        builder.conversation(load_data_source(str(chats / "conversations.jsonl")).dataset[0]["messages"], rng, chats)
    )
    for sample in samples:
        assert all(isinstance(token, int) for token in sample["input_ids"])
        assert (sample["input_ids"][0] == pipe.tokenizer.bos_token_id) == (pipe.tokenizer.bos_token_id is not None)
    common = ["--max-steps", "2", "--per-device-batch-size", "2", "--lr", "1e-3", "--dtype", "float32"]
    common += ["--checkpointing-steps", "0", "--cache-dir", str(tmp_path / "cache")]
    runs = [
        ("1", [pairs]),
        ("2", [stories / "stories.jsonl", pairs]),
        ("3", [chats / "conversations.jsonl"]),
    ]
    model = folder
    for stage, data in runs:
        output = tmp_path / f"stage{stage}"
        argv = [
            "train",
            "--stage",
            stage,
            "--model",
            str(model),
            "--data",
            *map(str, data),
            "--output-dir",
            str(output),
        ]
        assert main([*argv, *common]) == 0
        log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
        assert log and all(np.isfinite(entry["loss"]) for entry in log)
        assert type(AutoProcessor.from_pretrained(output / "mllm")).__name__ == "DreamLLMProcessor"
        model = output
    trained = DreamLLMPipeline.from_pretrained(model, dtype=torch.float32)
    assert (trained.mllm.config.pooled_projection_dim is not None) == (decoder == "sdxl")
    first = pipe.mllm.state_dict()
    last = trained.mllm.state_dict()
    assert any(not torch.equal(first[key], last[key]) for key in first if ".language_model.layers." in key)
