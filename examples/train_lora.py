#!/usr/bin/env python
"""Training a DreamLLM on both losses (next-token + 10 x diffusion) with `accelerate`: LoRA fine-tuning of a converted
model by default, the paper's stages with `--stage 1|2|3`.

The same as `dreamllm-hf train`; a plain script so that `accelerate launch` can start it on any setup:

    # one process (CPU or one GPU)
    python examples/train_lora.py --model dreamllm-7b-hf --data data/pairs --data data/mmc4.jsonl \
        --output-dir outputs/lora --max-steps 1000 --seed 0

    # 8 GPUs, DDP, bf16
    accelerate launch --config_file examples/accelerate/8gpu_ddp.yaml examples/train_lora.py \
        --model dreamllm-7b-hf --data data/shards --output-dir outputs/lora --max-steps 5000 --batch-size 4

    # options from a YAML/JSON file (flags win over it; see docs/training.md for an example)
    python examples/train_lora.py --config lora.yaml --max-steps 10

See docs/training.md for the data layouts, the adapter and how to use the result in a pipeline.
"""

import sys

from dreamllm_hf.training.cli import main


if __name__ == "__main__":
    sys.exit(main())
