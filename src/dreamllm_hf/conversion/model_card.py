"""Model cards (README.md) of DreamLLM folders, built with `huggingface_hub.ModelCard` / `ModelCardData`.

One generator for every card this package writes: `render_model_card` (metadata + a Jinja template), and
`model_facts`, what a pipeline folder's configs say about the model (backbones and their sizes, image tokens, dream
queries, picture size), so that no card states a fact the configuration does not.

The card of a converted folder is rendered from what `conversion.json` records (source, dtype, shards, verification
figures, the model's facts), so `dreamllm-hf push` can render it again for the repository it uploads to. Users can
change any metadata field (`fields`) and replace the body with their own Jinja template (`template`); the template
gets the variables listed in `template_variables`. The demo model's card (`shapes_world.model_card`) goes through
the same generator.
"""

import json
import math
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .. import constants as C


ARXIV_ID = "2309.11499"
ORIGINAL_REPO = "RunpeiDong/dreamllm-7b-chat-v1.0"

DEFAULT_METADATA = {
    "language": ["en"],
    # The release states no license of its own; it builds on Vicuna-7B v1.1 (LLaMA license), CLIP ViT-L/14 and Stable
    # Diffusion 2.1-base (CreativeML Open RAIL++-M). "other" + a link says exactly that; override with `fields`.
    "license": "other",
    "license_name": "dreamllm-original-release",
    "license_link": f"https://huggingface.co/{ORIGINAL_REPO}",
    "library_name": "diffusers",
    "pipeline_tag": "any-to-any",
    "tags": [
        "dreamllm",
        "multimodal",
        "any-to-any",
        "text-to-image",
        "image-to-text",
        "interleaved-generation",
        "stable-diffusion",
        "llama",
        "clip",
        "safetensors",
        f"arxiv:{ARXIV_ID}",
    ],
}

CITATION = """@inproceedings{dong2024dreamllm,
  title         = {{DreamLLM}: Synergistic Multimodal Comprehension and Creation},
  author        = {Dong, Runpei and Han, Chunrui and Peng, Yuang and Qi, Zekun and Ge, Zheng and Yang, Jinrong and
                   Zhao, Liang and Sun, Jianjian and Zhou, Hongyu and Wei, Haoran and Kong, Xiangwen and
                   Zhang, Xiangyu and Ma, Kaisheng and Yi, Li},
  booktitle     = {The Twelfth International Conference on Learning Representations (ICLR)},
  year          = {2024},
  eprint        = {2309.11499},
  archivePrefix = {arXiv}
}"""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

[DreamLLM](https://arxiv.org/abs/{{ arxiv_id }}) (Dong et al., ICLR 2024) in the Hugging Face format: a `transformers`
model that reads images and writes text, and a `diffusers` pipeline that also draws pictures, on its own or in the
middle of the text it writes.
{% if base_model %}
The weights are those of [{{ base_model }}](https://huggingface.co/{{ base_model }}), converted without retraining by
`dreamllm_hf` {{ converter_version }} from the release's pickles into safetensors ({{ dtype }}).
{% endif %}

## What DreamLLM is

DreamLLM is a multimodal large language model that both understands and creates images. Its language model sees
pictures through a CLIP vision tower (one token per image patch, read at a hidden layer, through a linear projector).
To draw, the model emits `<dream_start>`; a block of {{ num_dream_queries }} learned *dream queries* then goes through
the language model, and their final hidden states, through a linear condition projector, become the cross-attention
conditioning of a Stable Diffusion UNet in place of a text encoder. A drawn picture is read back through CLIP, so a
document can go on writing about what it drew: text and pictures interleave, with the model choosing where the
pictures go.
{% if language_model %}
## This checkpoint

What its configuration says:

| part | here |
|---|---|
| language model | {{ language_model }} |
| vision tower | {{ vision_tower }} |
| dream queries | {{ num_dream_queries }}, conditioning {{ num_dream_queries }} x {{ cross_attention_dim }} |
{% if picture_size %}| pictures | {{ picture_size }}x{{ picture_size }}: the UNet's sample size {{ unet_sample_size }} x the VAE's factor {{ vae_scale_factor }} |
{% endif %}| parameters | {{ parameters }} |
{% endif %}
## Files

| folder | what | class |
|---|---|---|
| `model_index.json` | the pipeline | `dreamllm_hf.pipelines.DreamLLMPipeline` |
| `mllm/` | language model, vision tower, projectors, dream queries; the processor's files too (a complete `transformers` repository) | `DreamLLMForConditionalGeneration` |
| `processor/` | tokenizer (the original's ids), CLIP image processor, chat template | `DreamLLMProcessor` |
| `unet/`, `vae/` | the Stable Diffusion UNet and VAE, the release's own copies | `UNet2DConditionModel`, `AutoencoderKL` |
| `scheduler/` | `DDPMScheduler`, which is what the original samples with | `DDPMScheduler` |
| `conversion.json` | provenance: source files, dtype, shards, verification figures | |

The release's config.json carries wrong generic token ids (bos 0, eos 1, pad -1); here they are the real ones
(bos {{ bos_token_id }}, eos {{ eos_token_id }}, pad {{ pad_token_id }}).

## Usage

Install `dreamllm_hf` (it registers the classes with `transformers` and provides the pipeline), then:

```python
import torch
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline

pipe = DreamLLMPipeline.from_pretrained("{{ repo_id }}", dtype=torch.float16).to("cuda")

# A document: the model writes and draws where it decides to.
out = pipe("Write a short illustrated story about a fox who learns to paint.", max_images=2)
out.save_html("story.html")

# Text (comprehension): a document without pictures; `<image>` marks where each picture goes.
from PIL import Image
image = Image.open("photo.jpg")
answer = pipe("<image>What is in the picture?", images=[image], allow_images=False).text[0]

# Image (text-to-image, as the original: the caption with no chat template), on the same components.
text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)
picture = text2image("a photo of a red bird sitting on a tree branch", guidance_scale=3.5,
                     num_inference_steps=50).images[0]
```

### 4-bit (NF4)

```python
import torch
from transformers import BitsAndBytesConfig
from dreamllm_hf import DreamLLMForConditionalGeneration
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline

quantization = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
    llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "model.condition_projector", "lm_head"],
)
mllm = DreamLLMForConditionalGeneration.from_pretrained(
    "{{ repo_id }}", subfolder="mllm", quantization_config=quantization, dtype=torch.float16, device_map="cuda"
)
pipe = DreamLLMPipeline.from_pretrained("{{ repo_id }}", mllm=mllm, dtype=torch.float16)
pipe.unet.to("cuda")
pipe.vae.to("cuda")
picture = DreamLLMText2ImagePipeline.from_pipe(pipe)("a watercolor painting of a lighthouse").images[0]
```

The language model alone also works with the plain `transformers` API:

```python
import torch
import dreamllm_hf  # registers DreamLLM with the Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{{ repo_id }}", subfolder="mllm", dtype=torch.float16)
processor = AutoProcessor.from_pretrained("{{ repo_id }}", subfolder="mllm")
```

`diffusers.DiffusionPipeline.from_pretrained("{{ repo_id }}")` also works once `dreamllm_hf` is imported.

## Conversion and parity

Converted with `dreamllm-hf convert` ({{ tensors }} tensors, {{ size }} in {{ shards }} safetensors file(s),
{{ dtype }}).
{% if ignored_count %}{{ ignored_count }} key(s) of the release that the original loader ignores too (RoPE `inv_freq`
buffers, plugin copies) were dropped.
{% endif %}
{% if parity_table %}
`--verify` compared the converted checkpoint with an independent reading of the release's tensors (stock
`LlamaForCausalLM` and `CLIPVisionModel` on the original keys, the projectors and dream queries as plain tensors,
diffusers UNet/VAE), on fixed random inputs, in {{ verify_dtype }} on {{ verify_device }}:

{{ parity_table }}
{% else %}
This conversion was not verified (`dreamllm-hf convert --verify` compares every weight and the model's outputs with the
release).
{% endif %}

## Limitations

- The weights are the original release's: the model inherits its abilities, its biases and the limits of its training
  data (LAION, MMC4, instruction data); it can produce wrong, offensive or unsafe text and pictures.
- {% if picture_size %}Pictures are {{ picture_size }}x{{ picture_size }} by default (the UNet's sample size x the VAE's factor). {% endif %}The
  conditioning is {{ num_dream_queries }} dream queries, not a text encoder, so prompt-engineering habits from Stable
  Diffusion do not carry over.
- The original never released its interleaved-generation script; the interleaved mode follows the authors' description
  (a picture after each `<dream_start>`, read back through CLIP).
- Positions follow the attention mask, so left-padded batches give each row's own result (the original did not).
- Sampling uses `DDPMScheduler` as the original; other diffusers schedulers work but were not part of its evaluation.
- License: see the original repository ({{ license_link }}); the parts it builds on carry their own licenses
  (LLaMA/Vicuna, CLIP, Stable Diffusion 2.1 under CreativeML Open RAIL++-M).

## Citation

```bibtex
{{ citation }}
```
"""


def _size(num_bytes: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.2f} {unit}"
    return f"{num_bytes} B"


def _count(parameters: int) -> str:
    for unit, factor in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if parameters >= factor:
            return f"{parameters / factor:.2f} {unit}"
    return str(parameters)


# How the cards name the backbones' model types; any other type is shown as it is.
MODEL_TYPE_NAMES = {"llama": "LLaMA", "clip_vision_model": "CLIP ViT"}
# The diffusers components' settings a card may state.
DIFFUSION_FACTS = {
    "unet": ("sample_size", "in_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type"),
    "vae": ("sample_size", "in_channels", "latent_channels", "block_out_channels", "scaling_factor"),
    "scheduler": ("_class_name", "num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing"),
}


def _safetensors_parameters(folder: Path) -> int | None:
    """Parameters stored in a component folder's safetensors files (read from their headers only)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as tensors:
            total += sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
    return total


def model_facts(folder: str | os.PathLike) -> dict:
    """What a pipeline folder's configs say about the model, for its card (plain JSON types, stored in `conversion.json`).

    Args:
        folder (`str` or `os.PathLike`): a pipeline folder (`mllm/`, and `unet/`, `vae/`, `scheduler/` when present).
    """
    from ..decoder_conditioning import vae_scale_factor
    from ..modeling import DreamLLMConfig

    folder = Path(folder)
    config = DreamLLMConfig.from_pretrained(folder / "mllm")
    text, vision = config.text_config, config.vision_config
    facts = {
        "text_model_type": text.model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "vision_model_type": vision.model_type,
        "vision_hidden_size": vision.hidden_size,
        "vision_num_hidden_layers": vision.num_hidden_layers,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_feature_layer": config.vision_feature_layer,
        "num_image_tokens": config.num_image_tokens,
        "num_dream_queries": config.num_dream_queries,
        "cross_attention_dim": config.cross_attention_dim,
        "special_token_ids": config.special_token_ids,
        "parameters": {"mllm": _safetensors_parameters(folder / "mllm")},
    }
    for name, keys in DIFFUSION_FACTS.items():
        path = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if path.is_file():
            component = json.loads(path.read_text())
            facts[name] = {key: component.get(key) for key in keys}
            if name != "scheduler":
                facts["parameters"][name] = _safetensors_parameters(folder / name)
    if "unet" in facts and "vae" in facts:
        facts["vae_scale_factor"] = vae_scale_factor(facts["vae"])
        facts["picture_size"] = facts["unet"]["sample_size"] * facts["vae_scale_factor"]
    return facts


def fact_phrases(facts: dict) -> dict:
    """The facts as the cards say them: `language_model`, `vision_tower`, `parameters`, `picture_size`, ... Empty
    strings for facts that are not recorded (a `conversion.json` written before they were)."""
    if "text_model_type" not in facts:
        return {"language_model": "", "vision_tower": "", "parameters": "", "picture_size": ""}
    text_name = MODEL_TYPE_NAMES.get(facts["text_model_type"], facts["text_model_type"])
    vision_name = MODEL_TYPE_NAMES.get(facts["vision_model_type"], facts["vision_model_type"])
    counts = facts.get("parameters", {})
    return {
        "language_model": (
            f"{text_name} {facts['num_hidden_layers']} layers x {facts['hidden_size']} ({facts['num_attention_heads']} "
            f"heads, MLP {facts['intermediate_size']}), vocabulary {facts['vocab_size']}"
        ),
        "vision_tower": (
            f"{vision_name} {facts['vision_num_hidden_layers']} layers x {facts['vision_hidden_size']} on "
            f"{facts['image_size']} px, patch {facts['patch_size']} ({facts['num_image_tokens']} image tokens, layer "
            f"{facts['vision_feature_layer']} read)"
        ),
        "parameters": ", ".join(f"{name} {_count(count)}" for name, count in counts.items() if count),
        "picture_size": facts.get("picture_size", ""),
        "unet_sample_size": facts.get("unet", {}).get("sample_size", ""),
        "vae_scale_factor": facts.get("vae_scale_factor", ""),
    }


def render_model_card(metadata: dict, template: str, variables: dict, template_path: bool = False) -> ModelCard:
    """The one card generator: `metadata` as the YAML front matter, the Jinja `template` rendered with `variables`.

    Args:
        metadata (`dict`): `ModelCardData` fields (license, tags, library_name, ...).
        template (`str`): the Jinja template text, or a file's path with `template_path=True`; it must contain
            `{{ card_data }}` between `---` lines to keep the metadata.
        variables (`dict`): what the template reads.
        template_path (`bool`, defaults to `False`): whether `template` is a path.
    """
    card_data = ModelCardData(**metadata)
    if template_path:
        card = ModelCard.from_template(card_data, template_path=str(template), **variables)
    else:
        card = ModelCard.from_template(card_data, template_str=template, **variables)
    # Jinja drops the template's final newline; a text file ends with one.
    return ModelCard(str(card).rstrip("\n") + "\n")


def template_variables(info: dict, repo_id: str) -> dict:
    """What a card template can use: repo_id, title, base_model, dtype, tensors, size, shards, parity_table, the
    model's facts (`language_model`, `vision_tower`, `picture_size`, `num_dream_queries`, ...), ..."""
    from .verify import VerificationReport

    verification = info.get("verification")
    report = VerificationReport.from_dict(verification) if verification else None
    config = info.get("config", {})
    ids = config.get("special_token_ids", {})
    return {
        "repo_id": repo_id,
        "title": repo_id.rsplit("/", 1)[-1],
        "arxiv_id": ARXIV_ID,
        "base_model": info.get("source", {}).get("base_model"),
        "converter_version": info.get("converter", {}).get("version", ""),
        "dtype": info.get("dtype", ""),
        "tensors": info.get("tensors", 0),
        "tensors_mllm": info.get("components", {}).get("mllm", {}).get("tensors", 0),
        "size": _size(info.get("bytes", 0)),
        "shards": info.get("shards", 0),
        "ignored_count": len(info.get("ignored_release_keys", [])),
        "num_dream_queries": config.get("num_dream_queries", ""),
        "cross_attention_dim": config.get("cross_attention_dim", ""),
        "bos_token_id": ids.get(C.BOS_TOKEN, ""),
        "eos_token_id": ids.get(C.EOS_TOKEN, ""),
        "pad_token_id": ids.get(C.PAD_TOKEN, ""),
        **fact_phrases(config),
        "parity_table": report.to_markdown() if report else "",
        "verify_dtype": report.compute_dtype if report else "",
        "verify_device": report.device if report else "",
        "verification": verification,
        "conversion": info,
        "citation": CITATION,
    }


def build_model_card(
    info: dict, *, repo_id: str, template: str | os.PathLike | None = None, fields: dict | None = None
) -> ModelCard:
    """The card of a converted folder whose `conversion.json` holds `info`.

    Args:
        info (`dict`): what `conversion.json` records (its `config` holds `model_facts`).
        repo_id (`str`): the Hub repository (or local folder) the usage snippets load from.
        template (`str` or `os.PathLike`, *optional*): a Jinja template file replacing the default body; it must
            contain `{{ card_data }}` between `---` lines to keep the metadata.
        fields (`dict`, *optional*): metadata overriding the defaults (e.g. `{"license": "apache-2.0", "tags":
            [...]}`); a value of None removes the field.
    """
    metadata = {key: (list(value) if isinstance(value, list) else value) for key, value in DEFAULT_METADATA.items()}
    base_model = info.get("source", {}).get("base_model")
    if base_model and not Path(str(base_model)).exists():
        metadata["base_model"] = base_model
    for key, value in (fields or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    variables = template_variables(info, repo_id)
    variables["license_link"] = metadata.get("license_link", f"https://huggingface.co/{ORIGINAL_REPO}")
    if template is not None:
        return render_model_card(metadata, template, variables, template_path=True)
    return render_model_card(metadata, TEMPLATE, variables)


__all__ = ["build_model_card", "fact_phrases", "model_facts", "render_model_card", "template_variables"]
