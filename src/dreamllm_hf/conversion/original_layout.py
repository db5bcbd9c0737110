"""What the original DreamLLM release looks like on disk, and how it maps onto `DreamLLMForConditionalGeneration`.

This module is the only place that knows the release's file names, config fields and state-dict keys.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import constants as C
from ..modeling.configuration_dreamllm import DreamLLMConfig


CONFIG_FILE = "config.json"
LLM_FILE = "pytorch_model.bin"
CLIP_FILE = "clip_vision_embedding.bin"
DREAM_FILE = "dream_embedding.bin"
DIFFUSION_FILE = "stable_diffusion_head.bin"
TOKENIZER_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
REQUIRED_FILES = (CONFIG_FILE, LLM_FILE, CLIP_FILE, DREAM_FILE, DIFFUSION_FILE, TOKENIZER_FILE)

COMPONENT_CONFIGS = Path(__file__).parent / "component_configs"
# Hub ids the release's config names, and the packaged configs that stand in for them.
KNOWN_CLIP_IDS = {"openai/clip-vit-large-patch14": COMPONENT_CONFIGS / "clip-vit-large-patch14"}
KNOWN_DIFFUSION_IDS = {"stabilityai/stable-diffusion-2-1-base": COMPONENT_CONFIGS / "stable-diffusion-2-1-base"}

LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "tie_word_embeddings",
    "initializer_range",
    "pretraining_tp",
)

# Keys of `pytorch_model.bin` the original loader discards: RoPE buffers (recomputed in fp32 from theta) and plugin
# weights an FSDP full-state save may add (the plugins are read from their own files).
IGNORED_LLM_KEYS = re.compile(
    r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"
    r"|^model\.(clip_vision_embedding|dream_embedding)\."
    r"|^stable_diffusion_head\."
)
IGNORED_CLIP_KEYS = re.compile(r"^clip_vision_model\.vision_model\.embeddings\.position_ids$")


class OriginalCheckpointError(ValueError):
    """The folder is not a DreamLLM checkpoint in the original release layout, or holds something we can't convert."""


@dataclass
class OriginalComponents:
    """Where the configs of the CLIP tower and the Stable Diffusion head come from."""

    clip_dir: Path
    diffusion_dir: Path
    notes: list[str] = field(default_factory=list)


def read_original_config(original_dir: Path) -> dict:
    original_dir = Path(original_dir)
    missing = [name for name in REQUIRED_FILES if not (original_dir / name).is_file()]
    if missing:
        raise OriginalCheckpointError(
            f"{original_dir} is not a DreamLLM checkpoint in the original release layout: "
            f"missing {', '.join(missing)}. "
            "Point --original at the folder of RunpeiDong/dreamllm-7b-chat-v1.0 (or a copy in the same layout)."
        )
    config = json.loads((original_dir / CONFIG_FILE).read_text())
    if config.get("model_type") != "dreamllm":
        raise OriginalCheckpointError(
            f"{original_dir / CONFIG_FILE} has model_type={config.get('model_type')!r}, expected 'dreamllm'."
        )
    return config


def _resolve_component(name_or_path: str, known: dict[str, Path], original_dir: Path, what: str) -> Path:
    if name_or_path in known:
        return known[name_or_path]
    for candidate in (original_dir / name_or_path, Path(name_or_path)):
        if candidate.is_dir():
            return candidate
    raise OriginalCheckpointError(
        f"The {what} is named {name_or_path!r}, which is neither a configuration shipped with dreamllm_hf "
        f"({', '.join(known)}) nor a folder (relative to {original_dir} or absolute). Put its configs in such a folder."
    )


def resolve_components(config: dict, original_dir: Path) -> OriginalComponents:
    plugins = config.get("plugins_init_kwargs", {})
    clip_kwargs = plugins.get("clip_vision_embedding", {})
    diffusion_kwargs = plugins.get("stable_diffusion_head", {})
    for name, kwargs in (("clip_vision_embedding", clip_kwargs), ("stable_diffusion_head", diffusion_kwargs)):
        if kwargs.get("projector_type", "linear") != "linear" or int(kwargs.get("projector_depth", 1)) != 1:
            raise OriginalCheckpointError(
                f"{name} uses a {kwargs.get('projector_type')} projector of depth {kwargs.get('projector_depth')}; "
                "only the released linear (depth 1) projectors are supported."
            )
    if clip_kwargs.get("use_additional_post_layernorm", False):
        raise OriginalCheckpointError("use_additional_post_layernorm=true is not part of any release; not supported.")
    clip_dir = _resolve_component(
        clip_kwargs.get("clip_vision_model_name_or_path", "openai/clip-vit-large-patch14"),
        KNOWN_CLIP_IDS,
        original_dir,
        "CLIP vision model",
    )
    diffusion_dir = _resolve_component(
        diffusion_kwargs.get("diffusion_name_or_path", "stabilityai/stable-diffusion-2-1-base"),
        KNOWN_DIFFUSION_IDS,
        original_dir,
        "Stable Diffusion model",
    )
    return OriginalComponents(clip_dir=clip_dir, diffusion_dir=diffusion_dir)


def _vision_config(clip_dir: Path) -> dict | None:
    """The CLIP vision config from a component folder; None for the packaged CLIP-L (the config's default)."""
    config_file = clip_dir / "config.json"
    if not config_file.is_file():
        return None
    clip = json.loads(config_file.read_text())
    vision = clip.get("vision_config", clip)  # a full CLIPConfig (as on the Hub) or a bare vision config
    dropped = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}
    vision = {key: value for key, value in vision.items() if key not in dropped}
    vision["model_type"] = "clip_vision_model"
    return vision


def special_token_ids(config: dict, added_tokens: dict[str, int] | None = None) -> dict[str, int]:
    """Token ids from `special_tokens2ids_dict` (what the original reads), not the generic ids, which are wrong.

    Without that table, the ids come from the release's `added_tokens.json` (`added_tokens`), else from the release's
    known ids; BOS and EOS are SentencePiece LLaMA's 1 and 2 either way.
    """
    table = config.get("special_tokens2ids_dict")
    if not table:
        ids = dict(added_tokens) if added_tokens else dict(C.RELEASE_ADDED_TOKEN_IDS)
        ids.update({C.BOS_TOKEN: C.RELEASE_BOS_TOKEN_ID, C.EOS_TOKEN: C.RELEASE_EOS_TOKEN_ID})
        return ids
    ids = {key: value for key, value in table.items() if key != "additional_special_tokens"}
    ids.update(table.get("additional_special_tokens", {}))
    return ids


def read_added_tokens(original_dir: Path) -> dict[str, int] | None:
    path = Path(original_dir) / ADDED_TOKENS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def build_config(
    config: dict, components: OriginalComponents, cross_attention_dim: int, added_tokens: dict[str, int] | None = None
) -> DreamLLMConfig:
    text_config = {key: config[key] for key in LLAMA_FIELDS if key in config}
    text_config["model_type"] = "llama"
    ids = special_token_ids(config, added_tokens)
    required = (C.BOS_TOKEN, C.EOS_TOKEN, C.PAD_TOKEN, *C.RELEASE_ADDED_TOKEN_IDS)
    missing = [token for token in required if token not in ids]
    if missing:
        raise OriginalCheckpointError(f"special_tokens2ids_dict in config.json lacks {', '.join(missing)}.")
    vocab_size = config.get("vocab_size", C.RELEASE_VOCAB_SIZE)
    out_of_range = {token: ids[token] for token in required if not 0 <= ids[token] < vocab_size}
    if out_of_range:
        raise OriginalCheckpointError(
            f"Special token ids {out_of_range} lie outside the vocabulary (vocab_size {vocab_size})."
        )
    text_config.update(bos_token_id=ids[C.BOS_TOKEN], eos_token_id=ids[C.EOS_TOKEN], pad_token_id=ids[C.PAD_TOKEN])
    plugins = config.get("plugins_init_kwargs", {})
    kwargs = {
        "text_config": text_config,
        "vision_feature_layer": plugins.get("clip_vision_embedding", {}).get("select_layer", -2),
        "num_dream_queries": plugins.get("dream_embedding", {}).get("num_dream_queries", C.NUM_DREAM_QUERIES),
        "cross_attention_dim": cross_attention_dim,
        "bos_token_id": ids[C.BOS_TOKEN],
        "eos_token_id": ids[C.EOS_TOKEN],
        "pad_token_id": ids[C.PAD_TOKEN],
        "image_start_token_id": ids[C.IMAGE_START_TOKEN],
        "image_patch_token_id": ids[C.IMAGE_PATCH_TOKEN],
        "image_end_token_id": ids[C.IMAGE_END_TOKEN],
        "dream_start_token_id": ids[C.DREAM_START_TOKEN],
        "dream_end_token_id": ids[C.DREAM_END_TOKEN],
        "image_token_id": ids[C.IMAGE_PLACEHOLDER],
        "dream_token_id": ids[C.DREAM_PLACEHOLDER],
    }
    vision_config = _vision_config(components.clip_dir)
    if vision_config is not None:
        kwargs["vision_config"] = vision_config
    return DreamLLMConfig(**kwargs)


def map_llm_key(key: str) -> str | None:
    """`pytorch_model.bin` key -> our key; None for keys the original ignores."""
    if IGNORED_LLM_KEYS.search(key):
        return None
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key == "lm_head.weight":
        return key
    return key  # left as is, so the strict load reports it as unexpected


def map_clip_key(key: str) -> str | None:
    if IGNORED_CLIP_KEYS.search(key):
        return None
    prefix = "clip_vision_model.vision_model."
    if key.startswith(prefix):
        return "model.vision_tower." + key[len(prefix) :]
    if key.startswith("projector.projector."):
        return "model.multi_modal_projector." + key[len("projector.projector.") :]
    return "clip_vision_embedding." + key


def map_dream_key(key: str) -> str | None:
    return "model.dream_queries.weight" if key == "dream_queries" else "dream_embedding." + key


def split_diffusion_key(key: str) -> tuple[str, str]:
    """`stable_diffusion_head.bin` key -> (component, key inside it): 'vae', 'unet' or 'mllm'."""
    if key == "projector.projector.weight":
        return "mllm", "model.condition_projector.weight"
    component, _, rest = key.partition(".")
    if component in ("vae", "unet"):
        return component, rest
    return "unknown", key


COMPONENTS = ("mllm", "unet", "vae")
WEIGHT_FILES = (LLM_FILE, CLIP_FILE, DREAM_FILE, DIFFUSION_FILE)


@dataclass
class ReleaseTensors:
    """The release's tensors under their new names, per output component ('mllm', 'unet', 'vae').

    The tensors are the loaded ones (memory-mapped), not copies; `ignored` lists the `(file, key)` pairs the original
    loader ignores too (RoPE buffers, plugin weights inside `pytorch_model.bin`, CLIP `position_ids`).
    """

    components: dict[str, dict]
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_tensors(self) -> int:
        return sum(len(tensors) for tensors in self.components.values())


def split_release_tensors(state_dicts: dict[str, dict]) -> ReleaseTensors:
    """Maps the four release state dicts (keyed by file name) onto the output components, in file order."""
    components: dict[str, dict] = {name: {} for name in COMPONENTS}
    ignored: list[tuple[str, str]] = []
    for file, mapper in ((LLM_FILE, map_llm_key), (CLIP_FILE, map_clip_key), (DREAM_FILE, map_dream_key)):
        for key, tensor in state_dicts[file].items():
            new_key = mapper(key)
            if new_key is None:
                ignored.append((file, key))
                continue
            if new_key == "model.dream_queries.weight" and tensor.dim() == 3:  # stored as [1, Q, hidden]
                if tensor.shape[0] != 1:
                    raise OriginalCheckpointError(
                        f"{file}: {key} has shape {tuple(tensor.shape)}, expected [1, Q, hidden]."
                    )
                tensor = tensor[0]
            components["mllm"][new_key] = tensor
    unknown = []
    for key, tensor in state_dicts[DIFFUSION_FILE].items():
        component, new_key = split_diffusion_key(key)
        if component == "unknown":
            unknown.append(key)
        else:
            components[component][new_key] = tensor
    if unknown:
        raise OriginalCheckpointError(f"Unexpected keys in {DIFFUSION_FILE}: {sorted(unknown)}")
    return ReleaseTensors(components=components, ignored=ignored)
