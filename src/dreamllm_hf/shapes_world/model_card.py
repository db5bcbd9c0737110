"""The demo model's card (`README.md` of the pipeline folder), written from the training report and the evaluation."""

import json
from pathlib import Path

from .demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS, DEMO_SEED


CARD_TEMPLATE = """---
library_name: diffusers
pipeline_tag: any-to-any
license: apache-2.0
tags:
- dreamllm
- toy
- shapes-world
- multimodal
---

# DreamLLM demo: a tiny DreamLLM that knows the shapes world

A DreamLLM (arXiv 2309.11499) small enough to ship inside the `dreamllm_hf` package ({size_mb:.1f} MB of safetensors)
and to train from scratch on two CPU cores in {total_min:.0f} minutes. It lives in a synthetic world of 32x32 pictures
with one coloured shape each (red, green, blue or yellow; circle, square or triangle) and it does all three things
DreamLLM does: it **captions** pictures, **draws** a caption, and **writes illustrated stories**, deciding by itself
where a picture goes (`<dream_start>`), drawing it from its dream queries and reading it back through its vision tower.

It is a demonstration and a test fixture, not a general model: it knows twelve captions, a handful of story
sentences and nothing else.

## Use

```python
import torch
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH

pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH)           # offline, a few MB
draw = DreamLLMText2ImagePipeline.from_pipe(pipe)                  # text-to-image on the same components
image = draw("a red circle", num_inference_steps={steps}, guidance_scale={guidance:g}).images[0]
caption = pipe("<image>", images=[image], allow_images=False, use_chat_template=False).text[0]
answer = pipe([{{"role": "user", "content": [image, "What is in the picture?"]}}], allow_images=False).text[0]
# The generator seeds the story's sampled text and its pictures (seed {demo_seed}: the story of `dreamllm-hf demo`).
story = pipe("Tell me a story.", do_sample=True, max_new_tokens=64, max_images=4, num_inference_steps={steps},
             guidance_scale={guidance:g}, generator=torch.Generator().manual_seed({demo_seed}))
story.save_html("story.html")
```

Prompts that work: captioning takes `<image>` alone without the chat template (the pretraining format), or a picture
and "What is in the picture?" / "Describe the picture." in a chat (stage III; less exact, see `chat_caption_accuracy`);
drawing takes a caption `a <colour> <shape>`; stories answer `Tell me a story.`, `Tell me a story with pictures.` or
`Write an illustrated story.` through the default Vicuna chat template, also after earlier turns. Sample pictures with `guidance_scale`
{guidance:g} and {steps} DDIM steps (what the evaluation below used; the pipeline's default guidance of 7.5
over-saturates this small decoder). `dreamllm-hf demo` writes a story to HTML with these settings.

## Evaluation (`dreamllm-hf evaluate-demo`)

{evaluation}

## Components

| part | what | parameters |
| --- | --- | --- |
| `mllm/` | `DreamLLMForConditionalGeneration`: {llm}, vocabulary {vocab} (SentencePiece BPE {sp_vocab} + the 8 DreamLLM tokens in the release's order); {tower}; {queries} dream queries; linear projectors | {mllm_params} |
| `processor/` | `DreamLLMProcessor`: the legacy-exact fast tokenizer + `{image_processor}` at 32 px | - |
| `unet/` | `UNet2DConditionModel` on 4x8x8 latents, blocks (32, 64), cross-attention on the {queries} x {cross_dim} dream embeddings plus the stock `addition_embed_type="text"` pooled path; v-prediction | {unet_params} |
| `vae/` | `AutoencoderKL`, 32x32x3 <-> 4x8x8, blocks (16, 16, 32), `scaling_factor` {scaling:.4f} | {vae_params} |
| `scheduler/` | `DDIMScheduler` (trailing timesteps) on the training schedule: 1000 steps, `squaredcos_cap_v2`, v-prediction | - |

## Training (`dreamllm-hf train-demo --seed {seed} --output DIR`)

Everything is trained here, from random initialisation, with one command and a fixed seed: {total_s:.0f} s on
{threads} CPU thread(s) (load average {load}). The tokenizer is a SentencePiece BPE trained deterministically on the
world's sentences (LLaMA settings: dummy prefix, identity normalization, whitespace kept, byte fallback), turned into
the DreamLLM tokenizer by `build_legacy_tokenizer`.

| stage | trains | on | steps x batch | wall time |
| --- | --- | --- | --- | --- |
{stages}

Stages I to III are configurations of the one trainer (`dreamllm-hf train`), each stage's output folder the next one's
model. Stage 0 stands in for what the original takes pretrained (SD 2.1's VAE and UNet, trained with its text encoder): the
UNet first learns to draw from a throw-away caption encoder, with caption dropout, so that later the dream queries
only have to learn to speak to a decoder that already listens. Stages I to III follow the paper, with deviations
forced by the scale: nothing is pretrained, so the CLIP tower and the LLM train in stage I too{creation_llm}; and a
share ({uncond:.0%}) of the text-to-image samples has no caption, so that `<s>` alone through the dream path - the
classifier-free-guidance unconditional of DreamLLM - means "any picture". Stories are preceded by the chat prompt of
a story instruction (masked from the loss), as the original's instruction-interleaved data. Stage III is the paper's
instruction tuning: conversations of one or two exchanges, a question about a picture the user gives (answered by its
caption) and/or a story whose pictures the assistant draws, tokenized exactly as the pipeline reads a conversation,
so that the model answers in a chat and keeps earlier turns, pictures in and out, in its context.

Checks along the way (held-out pictures, judged by `classify_shape_image`):

{checks}

## Limits

* A toy: twelve captions, a few story templates, 32x32 pictures; no knowledge of anything else.
* Its mistakes, in captions and in pictures alike, are mostly circles and squares taken for one another.
* Stories are short (one to three pictures, as in its training data) and their sentences follow a few templates.
"""


_FAMILY = {"llama": "LLaMA", "qwen2": "Qwen2", "clip_vision_model": "CLIP ViT", "siglip_vision_model": "SigLIP ViT"}


def _stage_rows(report: dict) -> str:
    recipe, timings = report["recipe"], report["timings_s"]
    rows = [
        (
            "0a autoencoder",
            "VAE",
            "pictures (L1 + L2 + 1e-8 KL)",
            recipe["vae_steps"],
            recipe["vae_batch_size"],
            "stage 0a autoencoder",
        ),
        (
            "0b diffusion decoder",
            "UNet + stand-in caption encoder",
            f"pairs, v-prediction, caption dropout {recipe['caption_dropout']:.0%}",
            recipe["unet_steps"],
            recipe["unet_batch_size"],
            "stage 0b diffusion decoder",
        ),
        (
            "I comprehension",
            "vision tower, image projector, LLM",
            "image -> caption, LM loss",
            recipe["comprehension_steps"],
            recipe["comprehension_batch_size"],
            "stage I comprehension",
        ),
        (
            "I creation",
            "dream queries, condition projector, LLM",
            "caption -> image, diffusion loss",
            recipe["creation_steps"],
            recipe["creation_batch_size"],
            "stage I creation",
        ),
        (
            "II joint (I-GPT)",
            "LLM, both projectors, dream queries",
            f"stories + pairs, LM + {recipe['loss_weight_vm']:g} x diffusion",
            recipe["joint_steps"],
            recipe["joint_batch_size"],
            "stage II joint",
        ),
        (
            "III instruction",
            "LLM, both projectors, dream queries",
            "conversations "
            f"{recipe.get('instruction_conversation_fraction', 0):.0%} + pairs, LM + {recipe['loss_weight_vm']:g} x "
            "diffusion",
            recipe.get("instruction_steps", 0),
            recipe.get("instruction_batch_size", 0),
            "stage III instruction",
        ),
    ]
    return "\n".join(
        f"| {name} | {trains} | {on} | {steps} x {batch} | {timings.get(key, 0):.0f} s |"
        for name, trains, on, steps, batch, key in rows
    )


def _checks(report: dict) -> str:
    lines = [
        f"* {record['stage']}: {record['check']} = {record['value']:.3f}"
        for record in report["history"]
        if "check" in record
    ]
    return "\n".join(lines) or "* (none recorded)"


def _evaluation(evaluation: dict | None) -> str:
    if not evaluation:
        return "Not measured yet: run `dreamllm-hf evaluate-demo --model DIR`."
    settings = evaluation.get("settings", {})
    return (
        "| figure | value | goal | what |\n| --- | --- | --- | --- |\n"
        f"| `caption_accuracy` | {evaluation['caption_accuracy']:.3f} | 0.90 | "
        f"{settings.get('num_caption_pictures', '?')} held-out pictures, greedy, colour and shape both right |\n"
        f"| `t2i_accuracy` | {evaluation['t2i_accuracy']:.3f} | 0.80 | 12 captions x "
        f"{settings.get('t2i_per_caption', '?')} seeds, judged by `classify_shape_image` |\n"
        f"| `interleaved_match` | {evaluation['interleaved_match']:.3f} | 0.80 | "
        f"{evaluation.get('interleaved_pictures', '?')} pictures in {settings.get('num_stories', '?')} sampled stories "
        "whose judged colour and shape match the sentence before them |\n"
        f"| `chat_caption_accuracy` | {evaluation.get('chat_caption_accuracy', float('nan')):.3f} | - | the same "
        'pictures asked about in a chat ("What is in the picture?" / "Describe the picture.") |\n\n'
        f"Settings: {settings.get('num_inference_steps', '?')} DDIM steps, guidance scale "
        f"{settings.get('guidance_scale', '?')}, seed {settings.get('seed', '?')}."
    )


def write_demo_model_card(model_dir: str | Path, report: dict | None = None, evaluation: dict | None = None) -> Path:
    """Writes `model_dir/README.md` from `training_report.json` (or `report`) and an `evaluate_pipeline` result."""
    model_dir = Path(model_dir)
    if report is None:
        report = json.loads((model_dir / "training_report.json").read_text())
    size = sum(path.stat().st_size for path in model_dir.rglob("*.safetensors"))
    counts = report.get("parameters", {})
    mllm_config = json.loads((model_dir / "mllm" / "config.json").read_text())
    processor_config = json.loads((model_dir / "processor" / "processor_config.json").read_text())
    text, vision = mllm_config["text_config"], mllm_config["vision_config"]
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    load = report.get("load_average_at_start") or report.get("load_average_at_end") or ["?"]
    card = CARD_TEMPLATE.format(
        size_mb=size / 2**20,
        total_min=report["total_s"] / 60,
        total_s=report["total_s"],
        threads=report.get("torch_threads", "?"),
        load=", ".join(f"{value:.2f}" if isinstance(value, float) else str(value) for value in load),
        seed=report["recipe"]["seed"],
        evaluation=_evaluation(evaluation),
        llm=(
            f"{_FAMILY.get(text['model_type'], text['model_type'])} {text['num_hidden_layers']} layers x "
            f"{text['hidden_size']} ({text['num_attention_heads']} heads, {text['num_key_value_heads']} key/value "
            f"heads, MLP {text['intermediate_size']})"
        ),
        tower=(
            f"{_FAMILY.get(vision['model_type'], vision['model_type'])} vision tower {vision['num_hidden_layers']} x "
            f"{vision['hidden_size']} on {vision['image_size']} px, patch {vision['patch_size']} "
            f"({processor_config.get('num_image_tokens', '?')} image tokens, layer {mllm_config['vision_feature_layer']} "
            "read)"
        ),
        image_processor=processor_config.get("image_processor", {}).get("image_processor_type", "image processor"),
        vocab=text["vocab_size"],
        sp_vocab=text["vocab_size"] - 8,
        queries=mllm_config["num_dream_queries"],
        cross_dim=mllm_config["cross_attention_dim"],
        mllm_params=f"{counts.get('mllm', 0) / 1e6:.2f} M",
        unet_params=f"{counts.get('unet', 0) / 1e6:.2f} M",
        vae_params=f"{counts.get('vae', 0) / 1e6:.2f} M",
        scaling=vae_config["scaling_factor"],
        stages=_stage_rows(report),
        uncond=report["recipe"]["unconditional_probability"],
        checks=_checks(report),
        steps=DEMO_NUM_INFERENCE_STEPS,
        guidance=DEMO_GUIDANCE_SCALE,
        demo_seed=DEMO_SEED,
        creation_llm=(
            " (in its creation half as well: captioning collapses there and comes back in stage II, see the checks)"
            if report["recipe"].get("creation_train_llm")
            else ""
        ),
    )
    path = model_dir / "README.md"
    path.write_text(card)
    return path


__all__ = ["write_demo_model_card"]
