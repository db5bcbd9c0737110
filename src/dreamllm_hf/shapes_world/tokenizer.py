"""The demo model's tokenizer: a small SentencePiece BPE trained on the shapes world's words, LLaMA style.

LLaMA's `tokenizer.model` is a SentencePiece BPE model with a dummy prefix, identity normalization, whitespace kept
as it is and byte fallback; the DreamLLM release appends its 8 special tokens after it. This builds the same kind of
file from the world's own texts (deterministically: one thread, no sampling of the input) and turns it into the
project's legacy-exact fast tokenizer with `build_legacy_tokenizer`, the 8 tokens in the release's relative order.
Byte fallback means any prompt can be tokenized (words outside the world become bytes, not `<unk>`).
"""

import io
from pathlib import Path

from .. import constants as C
from .world import COLOURS, SHAPES, STORY_CONTINUATIONS, STORY_ENDINGS, STORY_OPENINGS


DEMO_VOCAB_SIZE = 512  # 3 specials + 256 bytes + the world's pieces; the 8 DreamLLM tokens come after
STORY_INSTRUCTIONS = ("Tell me a story.", "Tell me a story with pictures.", "Write an illustrated story.")
CAPTION_QUESTIONS = ("What is in the picture?", "Describe the picture.")


def prompt_texts() -> set[str]:
    """The prompts a demo model is asked with (story instructions, caption questions, the chat template's frame), which
    every world's tokenizer learns besides the world's own sentences."""
    return set(STORY_INSTRUCTIONS + CAPTION_QUESTIONS) | {C.VICUNA_SYSTEM_PROMPT + " USER: ASSISTANT:"}


def world_texts() -> list[str]:
    """Every sentence the shapes world can say, plus the prompts the demo is asked with (each once, sorted)."""
    names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    texts = {f"a {name}" for name in names}
    for template in STORY_OPENINGS + STORY_CONTINUATIONS + STORY_ENDINGS:
        texts.update(template.format(name) for name in names)
    return sorted(texts | prompt_texts())


def train_sentencepiece(vocab_size: int = DEMO_VOCAB_SIZE, texts: list[str] | None = None) -> bytes:
    """A serialized SentencePiece BPE model (the bytes of a `tokenizer.model`) trained on `texts` (default: the
    world's). The settings are LLaMA's: `<unk>`, `<s>`, `</s>` = 0, 1, 2, no pad, dummy prefix, identity
    normalization, extra whitespace kept, digits split, byte fallback."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts if texts is not None else world_texts()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def release_ordered_added_tokens(first_id: int) -> dict[str, int]:
    """The 8 DreamLLM tokens at `first_id`.. in the release's relative order (32000..32007 there)."""
    base = C.RELEASE_ADDED_TOKEN_IDS[C.PAD_TOKEN]
    return {token: first_id + token_id - base for token, token_id in C.RELEASE_ADDED_TOKEN_IDS.items()}


def build_demo_tokenizer(
    work_dir: str | Path,
    vocab_size: int = DEMO_VOCAB_SIZE,
    model_max_length: int = 512,
    texts: list[str] | None = None,
):
    """Trains the SentencePiece model (on `texts`, default: `world_texts()`) into `work_dir/tokenizer.model` and
    returns the DreamLLM fast tokenizer."""
    import sentencepiece as spm

    from ..conversion.tokenizer import build_legacy_tokenizer

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_bytes = train_sentencepiece(vocab_size, texts)
    path = work_dir / "tokenizer.model"
    path.write_bytes(model_bytes)
    pieces = spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
    return build_legacy_tokenizer(path, release_ordered_added_tokens(pieces), model_max_length=model_max_length)


__all__ = [
    "CAPTION_QUESTIONS",
    "DEMO_VOCAB_SIZE",
    "STORY_INSTRUCTIONS",
    "build_demo_tokenizer",
    "prompt_texts",
    "release_ordered_added_tokens",
    "train_sentencepiece",
    "world_texts",
]
