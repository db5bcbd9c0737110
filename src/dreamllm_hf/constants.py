"""The DreamLLM token-stream format: special tokens, their release ids and the block layouts.

This is the single home of these facts; the config, processor, model, converter and data builders all read them
from here.
"""

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "[PAD]"

IMAGE_START_TOKEN = "<im_start>"
IMAGE_PATCH_TOKEN = "<im_patch>"  # fills both the image slots and the dream-query slots
IMAGE_END_TOKEN = "<im_end>"
DREAM_START_TOKEN = "<dream_start>"  # the token the model emits to ask for a picture
DREAM_END_TOKEN = "<dream_end>"
IMAGE_PLACEHOLDER = "<image>"  # text placeholder, expanded by the processor into an image block
DREAM_PLACEHOLDER = "<dream>"  # text placeholder, expanded into a dream block followed by an image block
# The format's own tokens, which every DreamLLM tokenizer adds (with `[PAD]`): the block tokens and the placeholders.
FORMAT_TOKENS = (
    IMAGE_START_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_END_TOKEN,
    DREAM_START_TOKEN,
    DREAM_END_TOKEN,
    IMAGE_PLACEHOLDER,
    DREAM_PLACEHOLDER,
)

# Ids fixed by the released tokenizer (`added_tokens.json` of RunpeiDong/dreamllm-7b-chat-v1.0); not in list order.
RELEASE_ADDED_TOKEN_IDS = {
    PAD_TOKEN: 32000,
    IMAGE_START_TOKEN: 32001,
    DREAM_END_TOKEN: 32002,
    DREAM_START_TOKEN: 32003,
    IMAGE_PATCH_TOKEN: 32004,
    IMAGE_END_TOKEN: 32005,
    IMAGE_PLACEHOLDER: 32006,
    DREAM_PLACEHOLDER: 32007,
}
RELEASE_BOS_TOKEN_ID = 1
RELEASE_EOS_TOKEN_ID = 2
RELEASE_UNK_TOKEN_ID = 0
RELEASE_VOCAB_SIZE = 32008

NUM_DREAM_QUERIES = 64

# Vicuna v1.1 as in training: "{system} USER: {u} ASSISTANT: {a}</s>USER: ... ASSISTANT:". A picture part is `<image>` in
# a user turn and `<dream>` (a drawn picture) in an assistant turn; an answer that begins with a picture follows
# "ASSISTANT:" without the space, as the model wrote it (it emits `<dream_start>` right after the colon).
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_chat_template(eos_token: str = EOS_TOKEN) -> str:
    """The Vicuna v1.1 chat template, its assistant turns ended by `eos_token` (`</s>` for the release; a model built
    from an LLM that has no chat template of its own uses it with that LLM's end-of-sequence token)."""
    eos = eos_token.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% if messages[0]['content'] is string %}{% set system = messages[0]['content'] %}"
        "{% else %}{% set system = namespace(v='') %}"
        "{% for part in messages[0]['content'] %}"
        "{% if part['type'] == 'text' %}{% set system.v = system.v + part['text'] %}{% endif %}"
        "{% endfor %}{% set system = system.v %}{% endif %}"
        "{% set messages = messages[1:] %}"
        "{% else %}{% set system = '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "' %}{% endif %}"
        "{{ system + ' ' }}"
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}"
        "{% else %}{% set text = namespace(v='') %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}"
        "{% set text.v = text.v + ('<dream>' if message['role'] == 'assistant' else '<image>') %}"
        "{% elif part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}{% endif %}"
        "{% endfor %}{% set text = text.v %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + text + ' ' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ 'ASSISTANT:' + ('' if text.startswith('<dream>') else ' ') + text + '" + eos + "' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


VICUNA_CHAT_TEMPLATE = vicuna_chat_template()
