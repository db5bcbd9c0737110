"""The model card (README.md) of a converted DreamLLM, built with `huggingface_hub.ModelCard` / `ModelCardData`.

The card is rendered from what `conversion.json` records (source, dtype, shards, verification figures), so `dreamllm-hf
push` can render it again for the repository it uploads to. Users can change any metadata field (`fields`) and replace
the body with their own Jinja template (`template`); the template gets the variables listed in `template_variables`.
"""

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


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

DreamLLM is a multimodal large language model that both understands and creates images. A Vicuna-7B (LLaMA) language
model sees pictures through a frozen CLIP ViT-L/14 (its second-to-last layer, 256 tokens per picture, through a linear
projector). To draw, the model emits `<dream_start>`; a block of {{ num_dream_queries }} learned *dream queries* then
goes through the language model, and their final hidden states, through a linear condition projector, become the
cross-attention conditioning of a frozen Stable Diffusion 2.1-base UNet in place of a text encoder. A drawn picture is
read back through CLIP, so a document can go on writing about what it drew: text and pictures interleave, with the
model choosing where the pictures go.

## Files

| folder | what | class |
|---|---|---|
| `model_index.json` | the pipeline | `dreamllm_hf.pipelines.DreamLLMPipeline` |
| `mllm/` | LLaMA-7B, CLIP ViT-L/14, projectors, dream queries | `DreamLLMForConditionalGeneration` |
| `processor/` | tokenizer (the original's ids), CLIP image processor, chat template | `DreamLLMProcessor` |
| `unet/`, `vae/` | Stable Diffusion 2.1-base, the release's own copies | `UNet2DConditionModel`, `AutoencoderKL` |
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

### 4-bit (about 6 GB of GPU memory for the language model)

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
processor = AutoProcessor.from_pretrained("{{ repo_id }}", subfolder="processor")
```

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
- Pictures are 512x512 (Stable Diffusion 2.1-base). The conditioning is {{ num_dream_queries }} dream queries, not a
  text encoder, so prompt-engineering habits from Stable Diffusion do not carry over.
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


def template_variables(info: dict, repo_id: str) -> dict:
    """What a card template can use: repo_id, title, base_model, dtype, tensors, size, shards, parity_table, ..."""
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
        "num_dream_queries": config.get("num_dream_queries", 64),
        "bos_token_id": ids.get("<s>", 1),
        "eos_token_id": ids.get("</s>", 2),
        "pad_token_id": ids.get("[PAD]", 32000),
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
        repo_id: the Hub repository (or local folder) the usage snippets load from.
        template: a Jinja template file replacing the default body; it must contain `{{ card_data }}` between `---`
            lines to keep the metadata.
        fields: metadata overriding the defaults (e.g. `{"license": "apache-2.0", "tags": [...]}`); a value of None
            removes the field.
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
    card_data = ModelCardData(**metadata)
    variables = template_variables(info, repo_id)
    variables["license_link"] = metadata.get("license_link", f"https://huggingface.co/{ORIGINAL_REPO}")
    if template is not None:
        return ModelCard.from_template(card_data, template_path=str(template), **variables)
    return ModelCard.from_template(card_data, template_str=TEMPLATE, **variables)
