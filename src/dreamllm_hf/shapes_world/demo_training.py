"""The recipe that trains the demo models: a tiny DreamLLM on a shapes world, on a CPU, from scratch.

`train_demo(output_dir)` is `dreamllm-hf train-demo`: the shipped model's recipe (`DemoRecipe()`) on the first world
(`FIRST_WORLD`: one shape on 32x32, a 3-layer vision tower, a UNet and a VAE of about a million parameters each,
minutes on two cores; the LLM has 4 layers). The stages follow the paper (arXiv 2309.11499, section 7 of
docs/dreamllm-original.md), plus a stage 0 for the parts the original takes pretrained; each concern has its module:

* `demo_recipe`: the settings and the components the recipe starts from (`--backbone`: `DEMO_BACKBONES`);
* `demo_decoder`: stage 0, the autoencoder and the diffusion decoder with a stand-in caption encoder;
* `demo_stages`: stages I to III, configurations of the one trainer (`dreamllm-hf train`) on the world's data;
* `demo_checks`: the checks after each stage, drawing through the text-to-image pipeline;
* here: the run from data to the published folder, its `training_report.json` and its model card.
"""

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .demo_checks import pictures_tensor, stand_in_drawing_checks
from .demo_decoder import train_autoencoder, train_diffusion_decoder
from .demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS, DEMO_SEED
from .demo_recipe import DemoRecipe, demo_mllm_config, demo_noise_scheduler, demo_processor, demo_sampling_scheduler
from .demo_stages import DemoStage, demo_stage_configs, run_demo_stage, write_demo_data
from .demo_worlds import FIRST_WORLD, DemoWorld
from .tokenizer import build_demo_tokenizer


TRAINING_REPORT = "training_report.json"


PIPELINE_FILES = ("model_index.json", "mllm", "processor", "scheduler", "unet", "vae")


def _publish(stage_dir: Path, output_dir: Path) -> None:
    """Copies the pipeline of a stage folder (not its log, arguments or checkpoints) into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source, target = stage_dir / name, output_dir / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    _drop_load_records(output_dir)


def _drop_load_records(model_dir: Path) -> None:
    """Removes what loading wrote into the configs (the source folder's path, how it was loaded, the sub-configs'
    dtype), so that a continued model's files are those a fresh run writes."""
    for path in model_dir.rglob("*.json"):
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            continue
        found = [config.pop(key) for key in ("_name_or_path", "is_local", "local_files_only") if key in config]
        for sub_config in ("text_config", "vision_config"):
            if isinstance(config.get(sub_config), dict) and "dtype" in config[sub_config]:
                found.append(config[sub_config].pop("dtype"))
        if found:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_demo(
    output_dir: str | Path,
    recipe: DemoRecipe | None = None,
    log=print,
    reuse_decoder: str | Path | None = None,
    *,
    world: DemoWorld = FIRST_WORLD,
    stage_configs: Callable[..., list[DemoStage]] = demo_stage_configs,
) -> dict:
    """Runs every stage and saves the pipeline to `output_dir` (`DreamLLMPipeline.save_pretrained` layout, plus
    `training_report.json` and the model card). Returns the report: the world, the recipe, the trainer configurations,
    the wall time of every stage and the loss history.

    Args:
        output_dir (`str` or `Path`): the folder to write (created if needed).
        recipe ([`DemoRecipe`], *optional*): the settings (default: the shipped model's).
        log (`Callable[[str], None]`): where the progress lines go.
        reuse_decoder (`str` or `Path`, *optional*): for experiments on stages I to III, a pipeline folder whose `vae/`
            and `unet/` replace stage 0.
        world ([`DemoWorld`]): the world to train in (default: the shipped model's).
        stage_configs (`Callable`): `(recipe, data, cache_dir) -> list[DemoStage]`, the trainer runs of stages I to
            III (default: `demo_stage_configs`, the recipe's); a research variant gives its own.
    """
    from ..modeling import DreamLLMForConditionalGeneration
    from ..pipelines import DreamLLMPipeline

    recipe = recipe or DemoRecipe()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings, history = {}, []
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    clock = time.perf_counter()
    started = clock

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        log(f"[{name}] {timings[name]:.1f} s")
        clock = now

    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)

    # Data and tokenizer ------------------------------------------------------------------------------------------
    work_dir = output_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    tokenizer = build_demo_tokenizer(work_dir, texts=world.tokenizer_texts(), model_max_length=world.max_length)
    config = demo_mllm_config(tokenizer, recipe.backbone, world)
    processor = demo_processor(tokenizer, recipe.backbone, config.num_image_tokens, world)
    pairs = world.pairs(recipe.num_pictures, recipe.seed)
    pictures = pictures_tensor(pairs)
    data = write_demo_data(work_dir / "data", recipe, pairs=pairs, world=world)
    lap("data")

    # Stage 0: the decoder, the recipe's own loop ---------------------------------------------------------------
    if reuse_decoder is None:
        vae, records = train_autoencoder(pictures, recipe, log, world)
        history += records
        lap("stage 0a autoencoder")
        unet, encoder, records = train_diffusion_decoder(vae, pictures, pairs["text"], tokenizer, recipe, log, world)
        history += records
        checks = stand_in_drawing_checks(unet, vae, encoder, tokenizer, recipe, world) if recipe.run_checks else []
        for check in checks:
            history.append(check)
            log(json.dumps(check))
        lap("stage 0b diffusion decoder")
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae = AutoencoderKL.from_pretrained(Path(reuse_decoder) / "vae").eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(Path(reuse_decoder) / "unet").eval().requires_grad_(False)
        history.append({"stage": "0", "reused_decoder": str(reuse_decoder)})

    # The untrained DreamLLM, saved as the pipeline stage I starts from -------------------------------------------
    torch.manual_seed(recipe.seed + 2)
    mllm = DreamLLMForConditionalGeneration(config)
    mllm.generation_config.pad_token_id = tokenizer.pad_token_id
    scheduler = demo_sampling_scheduler(demo_noise_scheduler())  # the trainer trains with DDPM on its schedule
    model_dir = work_dir / "stage-0"
    DreamLLMPipeline(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=scheduler).save_pretrained(
        model_dir
    )
    parameters = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("mllm", mllm), ("unet", unet), ("vae", vae))
    }
    del mllm

    # Stages I to III: the one trainer ----------------------------------------------------------------------------
    stages = stage_configs(recipe, data, cache_dir=str(work_dir / "hf-cache"))
    for stage in stages:
        stage_dir = work_dir / stage.name
        history += run_demo_stage(stage, model_dir, stage_dir, recipe, log, world)
        model_dir = stage_dir
        lap(stage.timing)

    # Save ------------------------------------------------------------------------------------------------------
    _publish(model_dir, output_dir)
    lap("save")
    report = {
        "world": world.name,
        "recipe": recipe.to_dict(),
        "stages": [asdict(stage) | {"arguments": _portable(stage.arguments)} for stage in stages],
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "parameters": parameters,
        "history": history,
    }
    (output_dir / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report, world=world)
    shutil.rmtree(work_dir)
    return report


def _portable(arguments: dict) -> dict:
    """A stage's arguments as the report keeps them: data paths by their folder name (the work folder is removed)."""
    named = dict(arguments)
    named["data"] = [Path(path).parent.name if path.endswith(".jsonl") else Path(path).name for path in named["data"]]
    named.pop("cache_dir", None)
    return named


def continue_demo_training(
    model_dir: str | Path,
    output_dir: str | Path,
    recipe: DemoRecipe | None = None,
    log=print,
    *,
    world: DemoWorld = FIRST_WORLD,
) -> dict:
    """Stage III alone, on a demo pipeline trained through stage II (`model_dir`, with its `training_report.json`);
    writes the result to `output_dir` with the report extended. The same as a full `train_demo` run with the same
    recipe: stage III seeds its own data and noise."""
    recipe = recipe or DemoRecipe()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    report = json.loads((model_dir / TRAINING_REPORT).read_text())
    if any(record.get("stage") == "III-instruction" for record in report["history"]):
        raise ValueError(f"{model_dir} already went through stage III; start from a model trained through stage II.")
    started = time.perf_counter()
    work_dir = output_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    data = write_demo_data(work_dir / "data", recipe, kinds=("pairs", "conversations"), world=world)
    data["stories"] = ""  # not used by stage III
    stage = next(
        stage
        for stage in demo_stage_configs(recipe, data, cache_dir=str(work_dir / "hf-cache"))
        if stage.name == "III-instruction"
    )
    history = run_demo_stage(stage, model_dir, work_dir / stage.name, recipe, log, world)
    _publish(work_dir / stage.name, output_dir)
    shutil.rmtree(work_dir)
    elapsed = round(time.perf_counter() - started, 1)
    report["recipe"] = recipe.to_dict()
    report["history"] += history
    report.setdefault("stages", []).append(asdict(stage) | {"arguments": _portable(stage.arguments)})
    report["timings_s"][stage.timing] = elapsed
    report["total_s"] = round(report["total_s"] + elapsed, 1)
    (output_dir / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report, world=world)
    return report


def write_demo_model_card(
    model_dir: str | Path,
    report: dict | None = None,
    evaluation: dict | None = None,
    world: DemoWorld = FIRST_WORLD,
) -> Path:
    """Writes `model_dir/README.md` through the package's one card generator (`dreamllm_hf.model_card`), with the
    demo's sampling settings (`demo_model_path`) and what `world` says of itself.

    Args:
        model_dir (`str` or `Path`): the demo pipeline folder.
        report (`dict`, *optional*): the training report; read from `model_dir/training_report.json` when not given.
        evaluation (`dict`, *optional*): an `evaluate_pipeline` result; without it the card says it was not measured.
        world ([`DemoWorld`]): the world the model was trained in.
    """
    from ..model_card import DemoFolder, build_model_card

    model_dir = Path(model_dir)
    if report is None:
        report = json.loads((model_dir / TRAINING_REPORT).read_text())
    folder = DemoFolder(
        model_dir,
        report,
        num_inference_steps=DEMO_NUM_INFERENCE_STEPS,
        guidance_scale=DEMO_GUIDANCE_SCALE,
        story_seed=DEMO_SEED,
        evaluation=evaluation,
        world=world.card_texts(),
        evaluation_table=world.evaluation_table,
    )
    path = model_dir / "README.md"
    build_model_card(folder).save(path)
    return path


__all__ = ["TRAINING_REPORT", "continue_demo_training", "train_demo", "write_demo_model_card"]
