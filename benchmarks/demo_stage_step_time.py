"""Seconds per optimizer step of `train-demo`'s stages I to III (through the one trainer), on short runs.

Full-size data and batches, `--steps` steps per stage (stage 0 one step, the checks after each stage skipped), so the
figures compare with the per-step times of a whole run (its model card and `training_report.json`):

    OMP_NUM_THREADS=1 python benchmarks/demo_stage_step_time.py --threads 1 --steps 20
    OMP_NUM_THREADS=2 python benchmarks/demo_stage_step_time.py --threads 2 --steps 20

The last line is one JSON object: seconds per step of each stage (its loop, from the train log) and the wall time of
each stage (the trainer's setup, the loop and writing the stage's pipeline folder).
"""

import argparse
import json
import tempfile

from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe
from dreamllm_hf.shapes_world.demo_training import train_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (stage III keeps the recipe's 1).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backbone", default="llama-clip")
    args = parser.parse_args()

    recipe = DemoRecipe(
        num_threads=args.threads,
        run_checks=False,  # quality is not what is measured here
        backbone=args.backbone,
        vae_steps=1,
        unet_steps=1,
        comprehension_steps=args.steps,
        creation_steps=args.steps,
        joint_steps=args.steps,
        instruction_steps=args.steps,
        logging_steps=args.steps,
    )
    with tempfile.TemporaryDirectory() as work:
        report = train_demo(f"{work}/demo", recipe, log=lambda line: None)
    per_step = {
        record["stage"]: round(record["elapsed_s"] / args.steps, 3)
        for record in report["history"]
        if record.get("step") == args.steps and not record["stage"].startswith("0")
    }
    stages = ("data", "stage I comprehension", "stage I creation", "stage II joint", "stage III instruction")
    print(
        json.dumps(
            {"threads": args.threads, "s_per_step": per_step, "wall_s": {k: report["timings_s"][k] for k in stages}}
        )
    )


if __name__ == "__main__":
    main()
