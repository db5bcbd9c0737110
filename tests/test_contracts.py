"""The contract checks of `contracts.py` (transformers' and diffusers' test mixins, our way) run against the model and
the two pipelines and the processor, all built by `dreamllm_hf.testing_utils`."""

import torch
from contracts import ModelContract, PipelineContract, ProcessorContract, Text2ImagePipelineContract, seeded
from transformers import LogitsProcessor, LogitsProcessorList

from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline


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
