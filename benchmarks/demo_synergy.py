"""The paper's synergy claim at toy scale: does learning to draw help the demo model to see?

Trains a comprehension-only DreamLLM with the demo recipe's budget of LLM updates (its stage I comprehension and
creation, stage II and stage III steps all spent on image -> caption, at the comprehension batch size) on the same stage-0 decoder, data and
seed, then measures caption accuracy on the same held-out pictures for it and for the jointly trained model.

    python benchmarks/demo_synergy.py                         # against the shipped demo model
    python benchmarks/demo_synergy.py --joint DIR --work DIR  # against another train-demo output

The last line is one JSON object.
"""

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
from dreamllm_hf.shapes_world.demo_training import DemoRecipe, train_demo
from dreamllm_hf.shapes_world.evaluation import DemoEvaluationSettings, caption_accuracy, load_demo_pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--joint", default=str(DEMO_MODEL_PATH), help="The jointly trained pipeline folder.")
    parser.add_argument("--work", default=None, help="Where the comprehension-only model is written (default: temp).")
    args = parser.parse_args()

    report = json.loads((Path(args.joint) / "training_report.json").read_text())
    joint_recipe = DemoRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["recipe"].items()})
    stages = ("comprehension_steps", "creation_steps", "joint_steps", "instruction_steps")
    steps = sum(getattr(joint_recipe, stage) for stage in stages)
    recipe = replace(joint_recipe, **dict.fromkeys(stages[1:], 0), comprehension_steps=steps)

    settings = DemoEvaluationSettings()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        train_demo(work, recipe, log=lambda line: None, reuse_decoder=args.joint)
        alone = caption_accuracy(load_demo_pipeline(work), settings)["caption_accuracy"]
    joint = caption_accuracy(load_demo_pipeline(args.joint), settings)["caption_accuracy"]
    print(f"caption accuracy on {settings.num_caption_pictures} held-out pictures, {steps} LLM updates each:")
    print(f"  comprehension only: {alone:.3f}")
    print(f"  joint (the recipe): {joint:.3f}")
    print(
        json.dumps(
            {
                "comprehension_only": alone,
                "joint": joint,
                "llm_updates": steps,
                "num_pictures": settings.num_caption_pictures,
            }
        )
    )


if __name__ == "__main__":
    main()
