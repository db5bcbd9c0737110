"""A fast tokenizer that reproduces the release's slow `LlamaTokenizer(legacy=True)` exactly.

The original tokenizes with the slow SentencePiece `LlamaTokenizer` of transformers 4.35 in legacy mode: the text is
split at the added tokens and every piece is encoded on its own, so each piece (including the text right after a
special token) gets SentencePiece's dummy-prefix `▁`. transformers 5's `LlamaTokenizer` only prepends `▁` to the
first piece, which changes the ids around `<image>`, `<dream>` and friends. Here the `▁` is added by the normalizer,
which the `tokenizers` library runs on each piece between added tokens: that is exactly the legacy behaviour.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from .. import constants as C


SPIECE_UNDERLINE = "▁"
_SENTENCEPIECE_BPE = 2  # `ModelProto.TrainerSpec.ModelType.BPE`
_DREAMLLM_ADDED_TOKENS = (C.PAD_TOKEN, *C.FORMAT_TOKENS)


def build_legacy_tokenizer(
    tokenizer_model: str | Path, added_tokens: dict[str, int], model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Builds the DreamLLM tokenizer as a fast tokenizer with the ids of the original slow one.

    Args:
        tokenizer_model: the release's SentencePiece `tokenizer.model` (a BPE model, LLaMA style).
        added_tokens: the release's `added_tokens.json` mapping (token -> id). The ids are fixed by the release and
            are reproduced as they are; a mapping that the vocabulary cannot give raises `ValueError`.
        model_max_length: the context length recorded in the tokenizer config.

    Returns:
        A `PreTrainedTokenizerFast` that adds BOS (no EOS), pads with `[PAD]` on the left, and saves as a plain
        `tokenizer.json` that `AutoTokenizer` loads back with the same ids.
    """
    extractor = SentencePieceExtractor(str(tokenizer_model))
    trainer_spec, normalizer_spec = extractor.proto.trainer_spec, extractor.proto.normalizer_spec
    _check_supported(trainer_spec, normalizer_spec)
    sp_model = extractor.extract(BPE)  # vocab + merges
    piece_of = {piece_id: piece for piece, piece_id in sp_model["vocab"].items()}
    bos, eos, unk = (piece_of[trainer_spec.bos_id], piece_of[trainer_spec.eos_id], piece_of[trainer_spec.unk_id])

    tokenizer = Tokenizer(
        BPE(
            vocab=sp_model["vocab"],
            merges=sp_model["merges"],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=trainer_spec.byte_fallback,
        )
    )
    # Normalizers run per piece between added tokens, so every piece gets its own dummy prefix (= legacy).
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if normalizer_spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # drop the dummy prefix of the first piece
        ]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
    ordered_added = _ordered_added_tokens(
        added_tokens, first_free_id=tokenizer.get_vocab_size(with_added_tokens=False)
    )
    for token, expected_id in ordered_added:
        tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)])
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(
                f"Added token {token!r} got id {tokenizer.token_to_id(token)}, but added_tokens.json fixes it at "
                f"{expected_id}; the ids of a release cannot be changed, so check that the mapping belongs to this "
                "tokenizer.model."
            )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer_spec.bos_id)]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=C.PAD_TOKEN,
        extra_special_tokens=[token for token, _ in ordered_added if token != C.PAD_TOKEN],
        padding_side="left",  # generation pads on the left
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # LLaMA has no token type ids
    )


def _check_supported(trainer_spec, normalizer_spec) -> None:
    """Refuses SentencePiece settings that the fast pipeline above would not reproduce."""
    if trainer_spec.model_type != _SENTENCEPIECE_BPE:
        raise ValueError(
            f"Expected a SentencePiece BPE model (LLaMA style), got model_type {trainer_spec.model_type}."
        )
    if normalizer_spec.precompiled_charsmap or normalizer_spec.remove_extra_whitespaces:
        raise ValueError(
            "This SentencePiece model normalizes its input (charsmap or whitespace folding); only the identity "
            "normalization of LLaMA tokenizers is supported."
        )


def _ordered_added_tokens(added_tokens: dict[str, int], first_free_id: int) -> list[tuple[str, int]]:
    """The added tokens in id order, checked to be the DreamLLM set on contiguous ids after the SentencePiece vocab."""
    missing = [token for token in _DREAMLLM_ADDED_TOKENS if token not in added_tokens]
    if missing:
        raise ValueError(f"added_tokens lacks the DreamLLM tokens {missing}; got {sorted(added_tokens)}.")
    ordered = sorted(added_tokens.items(), key=lambda item: item[1])
    expected_ids = list(range(first_free_id, first_free_id + len(ordered)))
    if [token_id for _, token_id in ordered] != expected_ids:
        raise ValueError(
            f"added_tokens must use the ids {expected_ids[0]}..{expected_ids[-1]} right after the {first_free_id} "
            f"SentencePiece pieces, got {dict(ordered)}."
        )
    return ordered


__all__ = ["build_legacy_tokenizer"]
