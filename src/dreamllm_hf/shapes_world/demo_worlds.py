"""What the demo recipe needs to know of the world it trains in: picture and model sizes, the data, the tokenizer's
texts, how the recipe's checks judge captions and drawings, and what the model card says of it.

`FIRST_WORLD` is the shipped demo model's (`world.py`: one shape on 32x32, twelve captions). The recipe takes any
`DemoWorld` (`train_demo(..., world=...)`); the research project `examples/research_projects/shapes_world_v2/` gives
its harder world this way.
"""

from dataclasses import dataclass


CHECK_SEED = 2_000_003  # the recipe's checks draw their held-out pictures with it: no training set uses it


@dataclass(frozen=True)
class DemoWorld:
    """A world the demo recipe can train in: its sizes, and the methods the recipe, its checks and the card call."""

    name: str
    image_size: int
    patch_size: int
    vision_sizes: dict
    vae_blocks: tuple[int, ...]
    unet_blocks: tuple[int, ...]
    stand_in_length: int  # stage 0b's caption encoder: the longest caption's tokens fit
    max_length: int  # the longest story or conversation of the world, in tokens, fits
    max_caption_tokens: int

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

    def conversation_sampler(self):
        """The `sampler` of `data.write_conversations_folder` (None: the first world's conversations)."""
        return None

    def check_captions(self, count: int) -> list[str]:
        """Captions the drawing checks draw (held out): `count` of them, or the world's every caption."""
        raise NotImplementedError

    def caption_right(self, answer: str, truth: str) -> bool:
        raise NotImplementedError

    def drawing_right(self, picture, caption: str) -> bool:
        raise NotImplementedError

    def card_texts(self) -> dict:
        """What the demo card says of the world (`model_card.DemoFolder.world`)."""
        raise NotImplementedError

    def evaluation_table(self, evaluation: dict) -> str:
        """The world's evaluation figures as the demo card states them."""
        raise NotImplementedError


class FirstWorld(DemoWorld):
    def pairs(self, num_samples, seed):
        from .data import pairs_dataset

        return pairs_dataset(num_samples, seed=seed)

    def tokenizer_texts(self):
        from .tokenizer import world_texts

        return world_texts()

    def check_captions(self, count):
        from .world import COLOURS, SHAPES

        return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]  # the world's every caption

    def caption_right(self, answer, truth):
        from .evaluation import caption_is_right, named_colour_and_shape

        return caption_is_right(answer, *named_colour_and_shape(truth))

    def drawing_right(self, picture, caption):
        from .evaluation import drawing_is_right, named_colour_and_shape

        return drawing_is_right(picture, *named_colour_and_shape(caption))

    def card_texts(self):
        from ..model_card import FIRST_WORLD_TEXTS

        return dict(FIRST_WORLD_TEXTS)

    def evaluation_table(self, evaluation):
        from ..model_card import first_world_evaluation_table

        return first_world_evaluation_table(evaluation)


FIRST_WORLD = FirstWorld(
    name="shapes",
    image_size=32,
    patch_size=4,  # 8x8 = 64 image tokens (patch 8 captioned only ~70 % in the same budget)
    vision_sizes=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
    vae_blocks=(16, 16, 32),  # 32x32x3 <-> 4x8x8
    unet_blocks=(32, 64),
    stand_in_length=8,
    max_length=512,
    max_caption_tokens=6,
)

__all__ = ["CHECK_SEED", "FIRST_WORLD", "DemoWorld", "FirstWorld"]
