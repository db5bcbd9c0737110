"""The demo recipe's settings and the components it starts from: tiny configurations of transformers' and diffusers'
own classes, sized by the world (`demo_worlds.py`).

`DemoRecipe()` is the shipped model's recipe, on the first world; `demo_training.train_demo` runs it. `--backbone`
chooses the LLM and the vision tower (`DEMO_BACKBONES`): a LLaMA with a CLIP tower (the shipped model) or a Qwen2 with
a SigLIP tower, the same sizes otherwise.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

from .demo_worlds import FIRST_WORLD, DemoWorld


NUM_DREAM_QUERIES = 8
CROSS_ATTENTION_DIM = 64
TEXT_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)


@dataclass
class DemoRecipe:
    """Every setting of the demo training; the defaults are the shipped model's recipe (on `FIRST_WORLD`)."""

    seed: int = 0
    num_threads: int | None = None  # None: torch's default (all cores)
    backbone: str = "llama-clip"  # a key of DEMO_BACKBONES
    num_pictures: int = 4096  # stage 0 pictures and stage I/II/III pairs
    num_stories: int = 1024
    num_conversations: int = 4096
    story_pictures: tuple[int, int] = (1, 3)
    # stage 0a: autoencoder
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-8
    # stage 0b: diffusion decoder with the stand-in caption encoder
    unet_steps: int = 1000
    unet_batch_size: int = 64
    unet_lr: float = 2e-3
    caption_dropout: float = 0.15
    stand_in_layers: int = 0  # transformer layers of the stand-in caption encoder after its embeddings
    # stage I: comprehension (i2t) then creation (t2i)
    comprehension_steps: int = 700
    comprehension_batch_size: int = 32
    comprehension_lr: float = 2e-3
    creation_steps: int = 300
    creation_batch_size: int = 32
    creation_lr: float = 2e-3
    creation_train_llm: bool = True  # the paper freezes its pretrained LLM in stage I; ours starts from scratch
    creation_i2t_probability: float = 0.0  # share of creation pairs kept image-to-text (LM loss), to keep captioning
    unconditional_probability: float = 0.1  # caption-less t2i samples: the guidance unconditional
    # stage II: I-GPT joint training
    joint_steps: int = 800
    joint_batch_size: int = 16
    joint_lr: float = 1e-3
    joint_story_fraction: float = 0.75
    loss_weight_vm: float = 10.0
    # stage III: instruction tuning on conversations (a picture in and its caption, a story out, or both in a row),
    # with pairs kept in the mix so that the plain caption and drawing prompts stay as they were
    instruction_steps: int = 600
    instruction_batch_size: int = 16
    instruction_lr: float = 5e-4
    instruction_conversation_fraction: float = 0.75
    # torch threads for stage III (None: as the other stages). Fixed, since float sums depend on it; one thread was
    # several times faster than two on a loaded machine (no spin-waiting) when the shipped model was trained.
    instruction_threads: int | None = 1
    warmup_fraction: float = 0.05
    logging_steps: int = 50
    # the checks after each stage: held-out pictures captioned, drawings per caption and their DDIM steps. run_checks
    # False skips those after stage 0b and stages I to III (for timing runs: the same weights are trained); the
    # autoencoder's always runs, since its posterior sample draws from the generator the UNet is then initialised from
    run_checks: bool = True
    check_pictures: int = 96
    check_per_caption: int = 8
    check_steps: int = 25

    def __post_init__(self):
        if self.backbone not in DEMO_BACKBONES:
            raise ValueError(f"`backbone` must be one of {sorted(DEMO_BACKBONES)}, got {self.backbone!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Components


def _special_token_ids(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def _llama_clip(tokenizer, world: DemoWorld):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=TEXT_SIZES["num_attention_heads"],
        max_position_embeddings=world.max_length,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **TEXT_SIZES,
        **_special_token_ids(tokenizer),
    )
    size = world.image_size
    vision = CLIPVisionConfig(image_size=size, patch_size=world.patch_size, projection_dim=64, **world.vision_sizes)
    # CLIP preprocessing at the world's size (OpenAI mean/std)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return text, vision, image_processor


def _qwen2_siglip(tokenizer, world: DemoWorld):
    from transformers import Qwen2Config, SiglipImageProcessor, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=TEXT_SIZES["num_attention_heads"] // 2,  # grouped-query attention, as Qwen2's own sizes
        max_position_embeddings=world.max_length,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **TEXT_SIZES,
        **_special_token_ids(tokenizer),
    )
    size = world.image_size
    vision = SiglipVisionConfig(image_size=size, patch_size=world.patch_size, **world.vision_sizes)  # no CLS token
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})  # mean/std 0.5
    return text, vision, image_processor


# name -> (tokenizer, world) -> (text config, vision config, image processor): tiny configs of transformers' own
# classes.
DEMO_BACKBONES: dict[str, Callable] = {"llama-clip": _llama_clip, "qwen2-siglip": _qwen2_siglip}


def demo_mllm_config(tokenizer, backbone: str = "llama-clip", world: DemoWorld = FIRST_WORLD):
    """The demo's [`DreamLLMConfig`]: an LLM of 4 x 128 and a vision tower of the world's size (first world: 3 x 64 on
    32 px, patch 4) from `DEMO_BACKBONES[backbone]`, 8 dream queries -> 64-d."""
    from ..modeling import DreamLLMConfig
    from ..modeling.configuration_dreamllm import token_ids_from_tokenizer

    text, vision, _ = DEMO_BACKBONES[backbone](tokenizer, world)
    return DreamLLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        vision_feature_layer=-2,  # the projector reads layer -2: the tower's last layer only exists for the format
        num_dream_queries=NUM_DREAM_QUERIES,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        tie_word_embeddings=False,
        **token_ids_from_tokenizer(tokenizer),
    )


def demo_processor(
    tokenizer, backbone: str = "llama-clip", num_image_tokens: int | None = None, world: DemoWorld = FIRST_WORLD
):
    """The backbone's image processor at the world's picture size + the tokenizer, 8 dream slots, and one image slot
    per patch (`num_image_tokens`: default the world's patch count, the model config's)."""
    from ..modeling import DreamLLMProcessor

    _, _, image_processor = DEMO_BACKBONES[backbone](tokenizer, world)
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens or world.num_image_tokens,
        num_dream_queries=NUM_DREAM_QUERIES,
    )


def demo_vae(world: DemoWorld = FIRST_WORLD):
    """The world's pictures <-> 4x8x8 latents (first world: 32x32x3, three blocks, two downsamplings; version 2:
    64x64x3, four blocks, three)."""
    from diffusers import AutoencoderKL

    blocks = world.vae_blocks
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.image_size,
    )


def demo_unet(world: DemoWorld = FIRST_WORLD):
    """A two-level UNet on 8x8 latents (the world's widths); cross-attention on the 8 x 64 conditioning everywhere,
    plus the stock pooled `addition_embed_type="text"` path (attention-pooled conditioning added to the timestep
    embedding)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=world.unet_blocks,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def demo_noise_scheduler():
    """DDPM, 1000 steps, cosine schedule (zero terminal SNR), v-prediction, no sample clipping (latents are not in
    [-1, 1])."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
    )


def demo_sampling_scheduler(noise_scheduler):
    """What the shipped pipeline samples with: DDIM on the training schedule, trailing timesteps (so sampling starts
    at t = 999, pure noise, where the cosine schedule ends)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)


__all__ = [
    "CROSS_ATTENTION_DIM",
    "DEMO_BACKBONES",
    "NUM_DREAM_QUERIES",
    "TEXT_SIZES",
    "DemoRecipe",
    "demo_mllm_config",
    "demo_noise_scheduler",
    "demo_processor",
    "demo_sampling_scheduler",
    "demo_unet",
    "demo_vae",
]
