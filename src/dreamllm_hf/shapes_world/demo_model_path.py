"""Where the shipped demo model lives (`src/dreamllm_hf/demo_model/`, a `DreamLLMPipeline.save_pretrained` folder)
and how it is sampled: its evaluation, the README's demo and the tests all read these."""

from pathlib import Path


DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "demo_model"

# DDIM steps and guidance for the demo model's pictures. Its small decoder over-saturates under the pipeline's default
# guidance of 7.5; the evaluation in its model card measured this setting.
DEMO_NUM_INFERENCE_STEPS = 25
DEMO_GUIDANCE_SCALE = 2.0

# The seed `dreamllm-hf demo` tells its story with: three pictures, each of what the sentence before it names (seeds 0
# to 5 tell stories with one or two). A document's generator seeds both its sampled text and its pictures, so each
# seed tells another story.
DEMO_SEED = 6

__all__ = ["DEMO_GUIDANCE_SCALE", "DEMO_MODEL_PATH", "DEMO_NUM_INFERENCE_STEPS", "DEMO_SEED"]
