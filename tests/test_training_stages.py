"""The paper's three stages through the one trainer (`train`), on the tiny converted fixture: stage I freezes the LLM
(only the projectors, the queries and the format-token rows move), stage II trains it in full or with LoRA, stage III
learns conversations from JSON Lines; each stage's output folder is the next stage's model, and a full run resumes bit
for bit. Plus the data pieces the stages need: conversations in files, instruction-led documents, caption dropout and
batches mixed from several sources in set shares.
"""

import json
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import draw_shape

from dreamllm_hf.shapes_world.data import write_pairs_folder, write_stories_folder


pytestmark = pytest.mark.usefixtures("one_thread")


def write_conversations(folder: Path) -> Path:
    """Four conversations as JSON Lines (pictures relative to the file): a picture read, then one drawn."""
    folder.mkdir(parents=True)
    lines = []
    for index, (colour, drawn) in enumerate(
        [("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green")]
    ):
        draw_shape(colour, "circle").save(folder / f"read{index}.png")
        draw_shape(drawn, "square").save(folder / f"drawn{index}.png")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": f"read{index}.png"}, {"type": "text", "text": "What is it?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": f"a {colour} circle"}]},
            {"role": "user", "content": [{"type": "text", "text": "Draw a square."}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Here it is."}, {"type": "image", "image": f"drawn{index}.png"}],
            },
        ]
        lines.append(json.dumps({"messages": messages}))
    (folder / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "conversations.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-data")
    pairs = write_pairs_folder(root / "pairs", 8, seed=0)
    docs = write_stories_folder(root / "docs", 4, seed=0, pictures=(2, 2)) / "stories.jsonl"
    return {
        "pairs": str(pairs),
        "docs": str(docs),
        "conversations": str(write_conversations(root / "conversations")),
        "cache": str(root / "hf-cache"),
    }


def _args(model, data_paths, output_dir, cache, **overrides):
    from dreamllm_hf.training import DreamLLMTrainingArguments

    values = dict(
        model=str(model),
        data=data_paths,
        output_dir=str(output_dir),
        max_steps=3,
        seed=0,
        learning_rate=1e-2,
        lr_scheduler="constant",
        per_device_batch_size=2,
        checkpointing_steps=0,
        dtype="float32",
        cache_dir=cache,
    )
    values.update(overrides)
    return DreamLLMTrainingArguments(**values)


def _mllm_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in load_file(folder / "mllm" / "model.safetensors").items()}


def _changed(before, after, prefix) -> bool:
    keys = [key for key in before if key.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[key], after[key]) for key in keys)


@pytest.fixture(scope="module")
def stage1(converted_tiny, data, tmp_path_factory):
    from dreamllm_hf.training import train

    output = tmp_path_factory.mktemp("stage1")
    result = train(_args(converted_tiny, [data["pairs"]], output, data["cache"], stage=1, max_steps=4))
    return result


def test_stage1_aligns_with_the_llm_frozen(stage1, converted_tiny):
    """Projectors and queries learn; the LLM and the vision tower stay bit for bit, but the format-token rows."""
    from dreamllm_hf.pipelines import DreamLLMPipeline
    from dreamllm_hf.training import format_token_ids

    assert stage1.pipeline_dir == stage1.output_dir
    before, after = _mllm_weights(converted_tiny), _mllm_weights(stage1.output_dir)
    assert before.keys() == after.keys()
    for prefix in ("model.multi_modal_projector.", "model.condition_projector.", "model.dream_queries."):
        assert _changed(before, after, prefix), prefix
    embeddings = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for key in before:
        if key.startswith(("model.language_model.", "lm_head.", "model.vision_tower.")) and key not in embeddings:
            assert torch.equal(before[key], after[key]), key
    rows = format_token_ids(DreamLLMPipeline.from_pretrained(stage1.output_dir).mllm.config)
    for key in embeddings:
        others = torch.ones(before[key].shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(before[key][others], after[key][others]), key
        assert not torch.equal(before[key][rows], after[key][rows]), key
    assert not list(stage1.output_dir.glob("adapter_*"))
    log = [json.loads(line) for line in stage1.log_path.read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]


def test_a_trained_vision_tower_gets_a_gradient_in_every_parameter(converted_tiny):
    """DDP (without `find_unused_parameters`) needs a gradient for every trained parameter at every step: the layers
    of a trained tower after the one read, and the whole tower in a batch without pictures, get exact zeros."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreamllm_hf.training import DreamLLMTrainingModel, apply_trainable_parts, load_mllm, trainable_parts

    mllm = load_mllm(converted_tiny)
    apply_trainable_parts(mllm, trainable_parts(1, vision_tower="full"))
    model = DreamLLMTrainingModel(
        mllm,
        UNet2DConditionModel.from_pretrained(converted_tiny / "unet"),
        AutoencoderKL.from_pretrained(converted_tiny / "vae"),
        DDPMScheduler.from_pretrained(converted_tiny / "scheduler"),
    ).train()
    ids = mllm.config.special_token_ids
    text_only = torch.tensor([[ids["<s>"], 5, 6, 7, ids["</s>"]]])
    model(input_ids=text_only, labels=text_only).loss.backward()
    tower = list(mllm.model.vision_tower.parameters())
    assert all(param.grad is not None and not param.grad.any() for param in tower)


def test_stage2_full_on_documents_and_pairs_loads_stage1(stage1, data, tmp_path):
    """The stage-I folder is stage II's model; the LLM trains in full, the vision tower stays frozen; the batches
    come from the two sources in the given shares; the output loads as a pipeline and runs."""
    from dreamllm_hf.pipelines import DreamLLMPipeline
    from dreamllm_hf.training import train

    result = train(
        _args(
            stage1.output_dir,
            [data["docs"], data["pairs"]],
            tmp_path,
            data["cache"],
            stage="pretraining",
            data_weights=[3, 1],
            max_steps=2,
            learning_rate=1e-3,
        )
    )
    before, after = _mllm_weights(stage1.output_dir), _mllm_weights(tmp_path)
    assert _changed(before, after, "model.language_model.layers.0.")
    assert _changed(before, after, "lm_head.")
    assert not _changed(before, after, "model.vision_tower.")
    saved = json.loads((tmp_path / "training_args.json").read_text())
    assert saved["stage"] == "pretraining" and saved["data_weights"] == [3.0, 1.0]
    pipe = DreamLLMPipeline.from_pretrained(result.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square", max_new_tokens=3, allow_images=False, use_chat_template=False)
    assert isinstance(out.text[0], str)


def test_stage2_lora_writes_the_adapter_and_the_merged_pipeline(stage1, data, tmp_path):
    from dreamllm_hf.pipelines import DreamLLMPipeline
    from dreamllm_hf.training import load_adapter, load_mllm, train

    result = train(
        _args(
            stage1.output_dir,
            [data["docs"], data["pairs"]],
            tmp_path,
            data["cache"],
            stage=2,
            language_model="lora",
            lora_rank=4,
            lora_alpha=8,
            lora_dropout=0.0,
            merge_lora=True,
            max_steps=2,
        )
    )
    assert (tmp_path / "adapter_model.safetensors").exists() and result.pipeline_dir == tmp_path
    merged = DreamLLMPipeline.from_pretrained(tmp_path, dtype=torch.float32).mllm
    expected = load_adapter(load_mllm(stage1.output_dir), tmp_path, merge=True)
    for name, value in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[name], value), name
    before = _mllm_weights(stage1.output_dir)
    assert _changed(before, _mllm_weights(tmp_path), "model.language_model.layers.0.self_attn.q_proj.")


def test_stage3_learns_conversations_from_json_lines(stage1, data, tmp_path):
    """Conversations with a picture read and one drawn: both losses are present from the first step."""
    from dreamllm_hf.training import train

    result = train(_args(stage1.output_dir, [data["conversations"]], tmp_path, data["cache"], stage=3, max_steps=2))
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert all(record["lm_loss"] > 0 and record["vm_loss"] > 0 for record in log)
    assert (tmp_path / "model_index.json").exists() and (tmp_path / "mllm" / "model.safetensors").exists()


def test_full_run_resumes_exactly(stage1, data, tmp_path):
    """Stage II in full: 4 steps in one go == 2 steps, checkpoint (trained parameters only), resume to 4."""
    from dreamllm_hf.training import train

    common = dict(
        stage=2,
        max_steps=4,
        checkpointing_steps=2,
        data_weights=[1, 1],
        gradient_accumulation_steps=2,
        per_device_batch_size=1,
        learning_rate=1e-3,
        seed=3,
    )
    sources = [data["docs"], data["pairs"]]
    train(_args(stage1.output_dir, sources, tmp_path / "straight", data["cache"], **common))
    train(_args(stage1.output_dir, sources, tmp_path / "broken", data["cache"], **{**common, "max_steps": 2}))
    checkpoint = tmp_path / "broken" / "checkpoint-2"
    saved = load_file(checkpoint / "trained_parameters.safetensors")
    assert "lm_head.weight" in saved and not any(key.startswith("model.vision_tower.") for key in saved)
    train(_args(stage1.output_dir, sources, tmp_path / "broken", data["cache"], resume="latest", **common))

    def log(name):
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line) | {"elapsed_s": 0} for line in lines]

    assert log("broken") == log("straight") and len(log("straight")) == 4
    a, b = _mllm_weights(tmp_path / "straight"), _mllm_weights(tmp_path / "broken")
    assert all(torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------------


def test_stage_presets_and_overrides():
    from dreamllm_hf.training import DreamLLMTrainingArguments, trainable_parts

    assert trainable_parts().language_model == "lora"  # no stage: today's LoRA fine-tuning
    assert trainable_parts(1).language_model == "frozen" and trainable_parts("1") == trainable_parts("alignment")
    assert trainable_parts("2").language_model == trainable_parts("instruction").language_model == "full"
    parts = trainable_parts("alignment", vision_tower="full", dream_queries=False, language_model=None)
    assert (parts.language_model, parts.vision_tower, parts.dream_queries) == ("frozen", "full", False)
    assert parts.fully_trained_modules() == (
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.condition_projector",
    )
    args = DreamLLMTrainingArguments(model="m", data=["d"], stage="3", train_format_tokens=False)
    assert args.stage == "instruction" and args.trainable_parts().format_tokens is False
    with pytest.raises(ValueError, match="`stage` must be one of .*got 'four'"):
        DreamLLMTrainingArguments(model="m", data=["d"], stage="four")
    with pytest.raises(ValueError, match="`language_model` must be one of .*got 'half'"):
        DreamLLMTrainingArguments(model="m", data=["d"], language_model="half")
    with pytest.raises(ValueError, match="`load_in_4bit`.*'lora'.*got 'full'"):
        DreamLLMTrainingArguments(model="m", data=["d"], stage=2, load_in_4bit=True)
    with pytest.raises(ValueError, match="`data_weights` has 1 weight.*2 data source"):
        DreamLLMTrainingArguments(model="m", data=["a", "b"], data_weights=[1.0])


def test_a_folder_without_model_index_gets_one(converted_tiny, data, tmp_path):
    """A folder assembled by hand (no `model_index.json`) still gives a pipeline folder that loads."""
    import shutil

    from dreamllm_hf.pipelines import DreamLLMPipeline
    from dreamllm_hf.training import train

    source = tmp_path / "by-hand"
    shutil.copytree(converted_tiny, source, ignore=shutil.ignore_patterns("model_index.json"))
    assert not (source / "model_index.json").exists()
    result = train(_args(source, [data["pairs"]], tmp_path / "out", data["cache"], stage=1, max_steps=1))
    index = json.loads((result.pipeline_dir / "model_index.json").read_text())
    assert index == {**json.loads((converted_tiny / "model_index.json").read_text()), "_diffusers_version": ANY}
    assert DreamLLMPipeline.from_pretrained(result.pipeline_dir).mllm is not None
    with pytest.raises(ValueError, match="`output_dir`.*is the `model` folder"):
        train(_args(source, [data["pairs"]], source, data["cache"], stage=1, max_steps=1))


def test_nothing_to_train_is_refused(converted_tiny, data, tmp_path):
    from dreamllm_hf.training import train

    off = dict(train_image_projector=False, train_condition_projector=False, train_dream_queries=False)
    args = _args(converted_tiny, [data["pairs"]], tmp_path, data["cache"], stage=1, train_format_tokens=False, **off)
    with pytest.raises(ValueError, match="Nothing to train"):
        train(args)


def test_cli_stage_options():
    import argparse

    from dreamllm_hf.training.cli import add_train_parser, training_arguments_from_namespace

    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    namespace = parser.parse_args(
        ["train", "--model", "m", "--data", "a", "b", "--stage", "1", "--vision-tower", "full"]
        + ["--no-train-dream-queries", "--data-weights", "3", "1", "--caption-dropout", "0.1", "--merge-lora"]
    )
    args = training_arguments_from_namespace(namespace)
    assert (args.stage, args.vision_tower, args.train_dream_queries) == ("alignment", "full", False)
    assert args.data_weights == [3.0, 1.0] and args.caption_dropout == 0.1 and args.merge_lora is True
    assert args.train_image_projector is None and args.trainable_parts().image_projector is True


# ------------------------------------------------------------------------------------------------------------------
# Data for the stages
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(converted_tiny):
    from dreamllm_hf import DreamLLMProcessor

    return DreamLLMProcessor.from_pretrained(converted_tiny / "processor")


def test_conversations_from_json_lines_match_the_builder(processor, data):
    """A `messages` JSON Lines file is a conversation source; a sample is what the builder makes of the same turns
    with the pictures given in memory."""
    from PIL import Image

    from dreamllm_hf.training import CONVERSATIONS, DreamLLMSampleBuilder, build_training_dataset, load_data_source

    source = load_data_source(data["conversations"], cache_dir=data["cache"])
    assert source.kind == CONVERSATIONS and len(source) == 4
    dataset = build_training_dataset([source], processor, 16, random_flip=False)
    folder = Path(data["conversations"]).parent
    messages = [
        {"role": "user", "content": [Image.open(folder / "read1.png"), "What is it?"]},
        {"role": "assistant", "content": "a green circle"},
        {"role": "user", "content": "Draw a square."},
        {"role": "assistant", "content": ["Here it is.", Image.open(folder / "drawn1.png")]},
    ]
    builder = DreamLLMSampleBuilder(processor, diffusion_resolution=16, random_flip=False)
    expected = builder.conversation(messages, builder.rng(1))
    sample = dataset[1]
    assert sample["input_ids"] == expected["input_ids"] and sample["labels"] == expected["labels"]
    assert torch.equal(sample["pixel_values"], expected["pixel_values"])
    assert torch.equal(sample["diffusion_pixel_values"], expected["diffusion_pixel_values"])


def test_conversations_with_string_content_and_an_images_column(processor, tmp_path):
    """Plain string contents (every message) read too; `{"type": "image"}` parts without a path take the `images`
    column in order; a file mixing string and list contents reads as well (`datasets` keeps them as JSON)."""
    import datasets

    from dreamllm_hf.training import build_training_dataset, source_from_dataset

    plain = tmp_path / "plain.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    plain.write_text(json.dumps(record) + "\n")
    sample_plain = build_training_dataset([plain], processor, 16, cache_dir=str(tmp_path / "cache"))[0]
    learned = [token for token in sample_plain["labels"] if token != -100]
    assert processor.tokenizer.decode(learned).strip() == "Hello.</s>"
    assert sample_plain["pixel_values"] is None and sample_plain["diffusion_pixel_values"] is None

    picture = draw_shape("red", "square")
    table = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
                ],
                "images": [picture],
            }
        ],
        features=datasets.Features(
            {
                "messages": [
                    {
                        "role": datasets.Value("string"),
                        "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                    }
                ],
                "images": datasets.Sequence(datasets.Image()),
            }
        ),
    )
    sample = build_training_dataset([source_from_dataset(table)], processor, 16)[0]
    assert torch.equal(
        sample["pixel_values"], processor.image_processor([picture], return_tensors="pt")["pixel_values"]
    )

    mixed = tmp_path / "mixed" / "mixed.jsonl"  # string contents in one message, parts in another
    mixed.parent.mkdir()
    record["messages"][1]["content"] = [{"type": "text", "text": "Hello."}]
    mixed.write_text(json.dumps(record) + "\n")
    again = build_training_dataset([mixed], processor, 16, cache_dir=str(tmp_path / "cache"))[0]
    assert again["input_ids"] == sample_plain["input_ids"] and again["labels"] == sample_plain["labels"]


def test_instruction_documents_mask_the_chat_prompt(processor):
    from dreamllm_hf.training import DreamLLMSampleBuilder

    builder = DreamLLMSampleBuilder(processor, diffusion_resolution=16, random_flip=False)
    image = draw_shape("red", "square")
    plain = builder.document(["A red square."], [image], [0], builder.rng(0))
    led = builder.document(["A red square."], [image], [0], builder.rng(0), instruction="Tell me a story.")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}], add_generation_prompt=True, tokenize=False
    )
    context = [processor.tokenizer.bos_token_id, *builder.tokenize(prompt)]
    assert led["input_ids"][: len(context)] == context
    assert led["labels"][: len(context)] == [-100] * len(context)

    def learned(sample):
        return processor.tokenizer.decode([token for token in sample["labels"] if token != -100]).strip()

    assert learned(led) == "A red square.<dream_start></s>"  # the plain document also "learns" its leading <s>
    assert learned(plain) == "<s> A red square.<dream_start></s>"
    assert led["diffusion_pixel_values"].shape[0] == plain["diffusion_pixel_values"].shape[0] == 1


def test_caption_dropout_leaves_text_to_image_pairs_without_caption(processor):
    from dreamllm_hf.training import DreamLLMSampleBuilder

    image = draw_shape("blue", "circle")
    bos, dream_start = processor.tokenizer.bos_token_id, processor.special_token_ids["<dream_start>"]
    builder = DreamLLMSampleBuilder(processor, diffusion_resolution=16, i2t_probability=0.0, caption_dropout=0.5)
    empty = [
        builder.pair(image, "a blue circle", builder.rng(i))["input_ids"][:2] == [bos, dream_start] for i in range(200)
    ]
    assert 0.35 < sum(empty) / len(empty) < 0.65
    default = DreamLLMSampleBuilder(processor, diffusion_resolution=16)
    assert default.caption_dropout == 0.0
    with pytest.raises(ValueError, match="`caption_dropout` must be in \\[0, 1\\], got 1.5"):
        DreamLLMSampleBuilder(processor, diffusion_resolution=16, caption_dropout=1.5)


def test_source_mixture_batches_keep_shares_and_never_repeat_within_an_epoch():
    from dreamllm_hf.training import SourceMixtureBatchSampler

    sampler = SourceMixtureBatchSampler([40, 400], [3, 1], batch_size=4, seed=0)
    batches = list(sampler)
    per_source = [sum(all(index < 40 for index in batch) for batch in batches), 0]
    per_source[1] = sum(all(index >= 40 for index in batch) for batch in batches)
    assert per_source == [10, 3] and len(batches) == len(sampler) == 13  # the small source is used up, 3 : 1
    indices = [index for batch in batches for index in batch]
    assert len(indices) == len(set(indices))
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    order = [all(index < 40 for index in batch) for batch in batches]
    assert order != sorted(order, reverse=True)  # the sources are interleaved, not one after the other
    with pytest.raises(ValueError, match="2 weight.*3 data source"):
        SourceMixtureBatchSampler([1, 2, 3], [1, 1], batch_size=1)
    with pytest.raises(ValueError, match="at least one > 0"):
        SourceMixtureBatchSampler([1, 2], [0, 0], batch_size=1)
    np.testing.assert_allclose(SourceMixtureBatchSampler([8, 8], [1, 0], 2).batches_per_source, [4, 0])


def test_a_zero_data_weight_leaves_a_source_out_but_not_every_source():
    from dreamllm_hf.training import DreamLLMTrainingArguments

    args = DreamLLMTrainingArguments(model="m", data=["a", "b"], data_weights=[1, 0], output_dir="o")
    assert args.data_weights == [1.0, 0.0]
    with pytest.raises(ValueError, match="at least one weight > 0"):
        DreamLLMTrainingArguments(model="m", data=["a", "b"], data_weights=[0, 0], output_dir="o")
    with pytest.raises(ValueError, match=r"data_weights\[1\]"):
        DreamLLMTrainingArguments(model="m", data=["a", "b"], data_weights=[1, -1], output_dir="o")
