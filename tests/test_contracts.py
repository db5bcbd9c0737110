"""The contract checks of `contracts.py` (transformers' and diffusers' test mixins, our way) run against the model,
the pipelines and the processor, all built by `dreamllm_hf.testing_utils`."""

import numpy as np
import PIL.Image
import torch
from contracts import (
    ModelContract,
    PipelineContract,
    ProcessorContract,
    Text2ImagePipelineContract,
    random_picture,
    seeded,
)
from transformers import LogitsProcessor, LogitsProcessorList

from dreamllm_hf.pipelines import (
    DreamLLMImg2ImgPipeline,
    DreamLLMInpaintPipeline,
    DreamLLMPipeline,
    DreamLLMText2ImagePipeline,
)


class TestDreamLLMForConditionalGeneration(ModelContract):
    pass


class TestDreamLLMProcessor(ProcessorContract):
    pass


class TestDreamLLMText2ImagePipeline(Text2ImagePipelineContract):
    pipeline_class = DreamLLMText2ImagePipeline
    other_pipeline_class = DreamLLMPipeline

    def get_dummy_inputs(self, pipe, seed=0):
        return dict(
            prompt="a red circle", generator=seeded(seed), num_inference_steps=2, guidance_scale=3.5, output_type="np"
        )

    def items(self, output):
        return list(output.images)


def start_picture(seed: int = 0):
    """A picture of the tiny decoder's size (16 px) to start from."""
    return random_picture(16, 16, seed)


def left_half_mask():
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255  # white: redrawn
    return PIL.Image.fromarray(mask)


class TestDreamLLMImg2ImgPipeline(Text2ImagePipelineContract):
    pipeline_class = DreamLLMImg2ImgPipeline
    other_pipeline_class = DreamLLMText2ImagePipeline

    def get_dummy_inputs(self, pipe, seed=0):
        # Half of 4 steps: the 2 steps the contract counts, from the picture noised half way.
        return dict(
            prompt="a red circle",
            image=start_picture(),
            strength=0.5,
            generator=seeded(seed),
            num_inference_steps=4,
            guidance_scale=3.5,
            output_type="np",
        )

    def items(self, output):
        return list(output.images)


class TestDreamLLMInpaintPipeline(Text2ImagePipelineContract):
    pipeline_class = DreamLLMInpaintPipeline
    other_pipeline_class = DreamLLMImg2ImgPipeline

    def get_dummy_inputs(self, pipe, seed=0):
        return dict(
            prompt="a red circle",
            image=start_picture(),
            mask_image=left_half_mask(),
            generator=seeded(seed),
            num_inference_steps=2,
            guidance_scale=3.5,
            output_type="np",
        )

    def items(self, output):
        return list(output.images)


class WordThenPicture(LogitsProcessor):
    """Every document writes one word, draws one picture and ends, decided from each row's own tokens (so a document
    is the same alone or in a batch)."""

    def __init__(self, processor):
        ids = processor.special_token_ids
        self.dream_start, self.dream_end = ids["<dream_start>"], ids["<dream_end>"]
        self.eos = processor.tokenizer.eos_token_id
        self.word = processor.tokenizer.convert_tokens_to_ids("▁red")

    def __call__(self, input_ids, scores):
        drawn = (input_ids == self.dream_end).any(-1)
        after_word = input_ids[:, -1] == self.word
        tokens = torch.where(drawn, self.eos, torch.where(after_word, self.dream_start, self.word))
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)


class TestDreamLLMPipeline(PipelineContract):
    pipeline_class = DreamLLMPipeline
    other_pipeline_class = DreamLLMText2ImagePipeline

    def get_dummy_inputs(self, pipe, seed=0):
        return dict(
            prompt="Tell me a story.",
            generator=seeded(seed),
            generation_kwargs={"logits_processor": LogitsProcessorList([WordThenPicture(pipe.processor)])},
            max_new_tokens=8,
            num_inference_steps=2,
            guidance_scale=3.5,
            output_type="np",
        )

    def items(self, output):
        assert all(len(images) == 1 for images in output.images)  # the script drew one picture in every document
        return [
            (output.text[i], output.stop_reasons[i], output.images[i][0].astype("float64"))
            for i in range(len(output.documents))
        ]
