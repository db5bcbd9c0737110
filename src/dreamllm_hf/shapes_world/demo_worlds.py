"""The two worlds the demo recipe trains in, and what differs between them: picture and model sizes, the data, the
tokenizer's texts and how the recipe's checks judge captions and drawings.

* "shapes": the first world (`world.py`): one shape on 32x32, twelve captions; the shipped demo model's.
* "scenes": the version-2 world (`scenes.py`): one or two shapes on 64x64 with sizes and relations, questions,
  stories of changes (issue 16).
"""

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DemoWorld:
    """What the recipe needs to know of a world. `recipe_defaults` are the `DemoRecipe` fields whose defaults differ
    from the first world's (`DemoRecipe.for_world` applies them)."""

    name: str
    image_size: int
    patch_size: int
    vision_sizes: dict
    vae_blocks: tuple[int, ...]
    unet_blocks: tuple[int, ...]
    stand_in_length: int  # stage 0b's caption encoder: the longest caption's tokens fit
    max_length: int  # the longest story or conversation of the world, in tokens, fits
    max_caption_tokens: int
    recipe_defaults: dict = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_blocks) - 1)

    def pairs(self, num_samples: int, seed: int):
        """A `datasets.Dataset` of `image` and `text` (its caption)."""
        raise NotImplementedError

    def tokenizer_texts(self) -> list[str]:
        raise NotImplementedError

    def story_sampler(self):
        """The `sampler` of `data.write_stories_folder` (None: the first world's stories)."""
        return None

    def conversation_sampler(self, creation: bool = True):
        """The `sampler` of `data.write_conversations_folder`; without `creation`, conversations with pictures in only."""
        return None

    def check_captions(self, count: int) -> list[str]:
        """Captions the drawing checks draw (held out)."""
        raise NotImplementedError

    def caption_right(self, answer: str, truth: str) -> bool:
        raise NotImplementedError

    def drawing_right(self, picture, caption: str) -> bool:
        raise NotImplementedError


class FirstWorld(DemoWorld):
    def pairs(self, num_samples, seed):
        from .data import pairs_dataset

        return pairs_dataset(num_samples, seed=seed)

    def tokenizer_texts(self):
        from .tokenizer import world_texts

        return world_texts()

    def conversation_sampler(self, creation=True):
        if not creation:
            raise ValueError("The comprehension-only control is defined for the version-2 world (`world='scenes'`).")
        return None

    def check_captions(self, count):
        from .world import COLOURS, SHAPES

        return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]  # the world's every caption

    def caption_right(self, answer, truth):
        from .evaluation import caption_is_right, named_colour_and_shape

        return caption_is_right(answer, *named_colour_and_shape(truth))

    def drawing_right(self, picture, caption):
        from .evaluation import drawing_is_right, named_colour_and_shape

        return drawing_is_right(picture, *named_colour_and_shape(caption))


class SceneWorld(DemoWorld):
    def pairs(self, num_samples, seed):
        from .scene_data import scene_pairs_dataset

        return scene_pairs_dataset(num_samples, seed=seed)

    def tokenizer_texts(self):
        from .tokenizer import scene_world_texts

        return scene_world_texts()

    def story_sampler(self):
        from .scene_data import illustrated_scene_story

        return illustrated_scene_story

    def conversation_sampler(self, creation=True):
        from .scene_data import sample_reading_conversation, sample_scene_conversation

        return sample_scene_conversation if creation else sample_reading_conversation

    def check_captions(self, count):
        from .scenes import sample_scene

        rng = random.Random(CHECK_SEED)
        return [sample_scene(rng).scene.caption() for _ in range(count)]

    def caption_right(self, answer, truth):
        from .scenes import captions_agree, parse_caption

        return captions_agree(answer, parse_caption(truth))

    def drawing_right(self, picture, caption):
        from .scene_judge import drawing_shows
        from .scenes import parse_caption

        return drawing_shows(picture, parse_caption(caption))


CHECK_SEED = 2_000_003  # held out: no training set uses it

DEMO_WORLDS: dict[str, DemoWorld] = {
    "shapes": FirstWorld(
        name="shapes",
        image_size=32,
        patch_size=4,  # 8x8 = 64 image tokens (patch 8 captioned only ~70 % in the same budget)
        vision_sizes=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
        vae_blocks=(16, 16, 32),  # 32x32x3 <-> 4x8x8
        unet_blocks=(32, 64),
        stand_in_length=8,
        max_length=512,
        max_caption_tokens=6,
    ),
    "scenes": SceneWorld(
        name="scenes",
        image_size=64,
        patch_size=8,  # 8x8 = 64 image tokens
        # deeper than the first world's: two things, their sizes and where they stand (3 x 64 captioned 0.40 exactly
        # after 700 steps, 4 x 128 0.60 after 1500)
        vision_sizes=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4),
        vae_blocks=(16, 16, 32, 32),  # 64x64x3 <-> 4x8x8, Stable Diffusion's factor of 8
        unet_blocks=(64, 128),
        stand_in_length=16,
        max_length=1024,
        max_caption_tokens=24,
        recipe_defaults=dict(
            num_pictures=8192,
            story_pictures=(3, 4),
            vae_steps=600,
            unet_steps=2000,
            stand_in_layers=2,
            comprehension_steps=2500,
            creation_steps=400,
            creation_i2t_probability=0.5,  # half the creation pairs stay captions: creation alone unlearns reading
            joint_steps=600,
            instruction_steps=500,
            instruction_threads=None,
        ),
    ),
}

__all__ = ["DEMO_WORLDS", "DemoWorld"]
