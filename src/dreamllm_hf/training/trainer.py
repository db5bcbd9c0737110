"""The one training loop: `accelerate` runs it unchanged on one device, under DDP, FSDP or DeepSpeed.

`train(DreamLLMTrainingArguments(...))` loads a DreamLLM folder (`mllm/`, `processor/`, `unet/`, `vae/`,
`scheduler/`: what `dreamllm-hf convert` and `DreamLLMPipeline.save_pretrained` write), sets what is trained, frozen
or LoRA-wrapped (`stages.py`: a stage preset of the paper, or plain LoRA fine-tuning, with per-part overrides),
builds the data (`data.py`) and optimizes the DreamLLM loss (`losses.py`). Nothing here is distributed by hand:
`accelerate launch` (or a plain `python`) decides the processes, and `Accelerator` wraps the model, optimizer, data
loader and scheduler.

Output folder:

* a LoRA run: `adapter_config.json`, `adapter_model.safetensors`, the final adapter
  (`PeftModel.from_pretrained(mllm, OUTPUT_DIR)`); with `merge_lora`, also the complete pipeline below, the adapter
  merged in;
* any other run (a frozen or fully trained language model): the complete pipeline, `model_index.json`, `mllm/` (the
  trained model) and `processor/`, `unet/`, `vae/`, `scheduler/` (copied from `model`), which
  `DreamLLMPipeline.from_pretrained(OUTPUT_DIR)` and the next stage's `model` load;
* `train_log.jsonl`: one JSON object per logged step (`step`, `loss`, `lm_loss`, `vm_loss`, `lr`, `epoch`,
  `skipped_pictures`), each loss averaged over the micro-batches (of every process) that had it since the last line;
  `null` when none had it (no language-model targets, or no picture to draw); `skipped_pictures` counts the pictures
  of documents left out since the last line because they could not be opened (see `data.py`);
* `checkpoint-STEP/`: every `checkpointing_steps` steps, the trained weights (the adapter, or the trained parameters
  of the model; under FSDP the sharded state dict, one file per process) plus the optimizer, scheduler, data-sampler
  and RNG states (`--resume` continues from the latest complete one, bit for bit on the same setup). A checkpoint is
  written as `checkpoint-STEP.partial/` and renamed once every process's files and then its `trainer_state.json` (the
  completion marker) are in, so a run killed while writing one leaves nothing `--resume` would take;
* `training_args.json`, `trainer_state.json`.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checks
from ..decoder_conditioning import vae_scale_factor
from ..dtypes import DTYPE_NAMES, parse_dtype
from ..modeling.folder_layout import MLLM_FOLDER, save_processor_with_model
from .data import IGNORE_INDEX
from .lora import format_token_ids
from .losses import DEFAULT_LOSS_WEIGHT_LM, DEFAULT_LOSS_WEIGHT_VM
from .stages import LANGUAGE_MODEL_MODES, VISION_TOWER_MODES, TrainableParts, resolve_stage, trainable_parts


logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
TRAINED_WEIGHTS_NAME = "trained_parameters.safetensors"  # a checkpoint's trained parameters (runs without LoRA)
PIPELINE_PARTS = ("processor", "unet", "vae", "scheduler")  # copied as they are into a run's pipeline folder
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_CHECKPOINT_SUFFIX = ".partial"  # a checkpoint being written; renamed to checkpoint-STEP when complete
MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BELOW_ONE = checks.NumberRange(integer=False, minimum=0, maximum=1, exclusive_maximum=True)
# What every number of `DreamLLMTrainingArguments` may be (a config file's values meet no argparse `type=`), and
# whether it may be None.
ARGUMENT_RANGES = {
    "max_steps": (checks.POSITIVE_INT, False),
    "seed": (checks.SEED, False),
    "lora_rank": (checks.POSITIVE_INT, False),
    "lora_alpha": (checks.POSITIVE_NUMBER, False),
    "lora_dropout": (_BELOW_ONE, False),
    "loss_weight_lm": (checks.NON_NEGATIVE_NUMBER, False),
    "loss_weight_vm": (checks.NON_NEGATIVE_NUMBER, False),
    "learning_rate": (checks.POSITIVE_NUMBER, False),
    "warmup_steps": (checks.NON_NEGATIVE_INT, False),
    "weight_decay": (checks.NON_NEGATIVE_NUMBER, False),
    "adam_beta1": (_BELOW_ONE, False),
    "adam_beta2": (_BELOW_ONE, False),
    "adam_epsilon": (checks.POSITIVE_NUMBER, False),
    "max_grad_norm": (checks.NON_NEGATIVE_NUMBER, False),
    "per_device_batch_size": (checks.BATCH_SIZE, False),
    "gradient_accumulation_steps": (checks.POSITIVE_INT, False),
    "global_batch_size": (checks.POSITIVE_INT, True),
    "max_length": (checks.POSITIVE_INT, True),
    "i2t_probability": (checks.PROBABILITY, False),
    "caption_dropout": (checks.PROBABILITY, False),
    "num_workers": (checks.NON_NEGATIVE_INT, False),
    "checkpointing_steps": (checks.NON_NEGATIVE_INT, False),
    "checkpoints_total_limit": (checks.POSITIVE_INT, True),
    "logging_steps": (checks.POSITIVE_INT, False),
}
# A flag for an optional bool (None: the stage decides): given alone it means True (`--no-NAME` is False).
_OPTIONAL_FLAG = {"nargs": "?", "const": True}


@dataclass
class DreamLLMTrainingArguments:
    """
    Everything `train` needs. The command line (`dreamllm-hf train`, built from these fields by
    `transformers.HfArgumentParser`) and config files (YAML or JSON) use the same names: each field's `help` metadata
    is its documentation, which `dreamllm-hf train --help` prints with the default.
    """

    model: str = field(
        default="",
        metadata={
            "help": "DreamLLM folder (mllm/, processor/, unet/, vae/, scheduler/), as `dreamllm-hf convert` or a "
            "previous stage writes it.",
            "metavar": "DIR",
        },
    )
    data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Data sources, repeatable: image folders with metadata.jsonl (pairs), MMC4 JSON Lines "
            "(documents), JSON Lines of `messages` (conversations), Parquet shards, or webdataset .tar shards of "
            "pairs (see `data.py`).",
            "action": "extend",
            "metavar": "PATH",
        },
    )
    output_dir: str = field(
        default="outputs/dreamllm-lora",
        metadata={
            "help": "Where the adapter or the pipeline, train_log.jsonl and the checkpoint-STEP/ folders go.",
            "metavar": "DIR",
        },
    )
    max_steps: int = field(
        default=1000,
        metadata={
            "help": "Optimizer steps to run (a step is `gradient_accumulation_steps` micro-batches on every process).",
            "metavar": "N",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seeds the adapter init, the data order and choices, and the diffusion noise.",
            "metavar": "S",
        },
    )
    stage: str | None = field(
        default=None,
        metadata={
            "help": "A preset of what trains (`stages.py`): 1 / alignment (the LLM frozen), 2 / pretraining (I-GPT, "
            "the LLM in full), 3 / instruction (the LLM in full); unset: LoRA fine-tuning. The six options below "
            "override it where they are set.",
            "metavar": "STAGE",
        },
    )
    language_model: str | None = field(
        default=None,
        metadata={
            "help": "The LLM: frozen, LoRA-wrapped or trained in full (unset: the stage's).",
            "choices": LANGUAGE_MODEL_MODES,
        },
    )
    vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "The vision tower: frozen or trained in full (unset: the stage's).",
            "choices": VISION_TOWER_MODES,
        },
    )
    train_image_projector: bool | None = field(
        default=None,
        metadata={
            "help": "Train the image projector in full (unset: as the stage says; every stage trains it).",
            **_OPTIONAL_FLAG,
        },
    )
    train_condition_projector: bool | None = field(
        default=None,
        metadata={
            "help": "Train the condition projector in full (unset: as the stage says; every stage trains it).",
            **_OPTIONAL_FLAG,
        },
    )
    train_dream_queries: bool | None = field(
        default=None,
        metadata={
            "help": "Train the dream queries (unset: as the stage says; every stage trains them).",
            **_OPTIONAL_FLAG,
        },
    )
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (see `lora.py`)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_lm_head: bool = field(
        default=False,
        metadata={"help": "Also put a LoRA on lm_head (otherwise only the format-token rows of lm_head train)."},
    )
    train_format_tokens: bool = field(
        default=True,
        metadata={
            "help": "Train the embedding and lm_head rows of the format tokens, when the LLM is not trained in full."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "After a LoRA run, also write the complete pipeline with the adapter merged in."},
    )
    loss_weight_lm: float = field(default=DEFAULT_LOSS_WEIGHT_LM, metadata={"help": "Weight of the next-token loss."})
    loss_weight_vm: float = field(
        default=DEFAULT_LOSS_WEIGHT_VM,
        metadata={"help": "Weight of the diffusion loss (the original's 10; 0 skips the UNet)."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW's learning rate.", "aliases": ["--lr"]})
    lr_scheduler: str = field(
        default="cosine",
        metadata={"help": "Any `transformers.get_scheduler` name: cosine, linear, constant, ..."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear learning-rate warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW's epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    per_device_batch_size: int = field(
        default=1, metadata={"help": "Samples per process per micro-batch.", "aliases": ["--batch-size"]}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per optimizer step over all processes: sets `gradient_accumulation_steps` to it / "
            "(processes x `per_device_batch_size`), which must be whole; the same recipe then runs on any process "
            "count that divides it.",
            "metavar": "N",
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Autocast precision, by accelerate (the trained parameters stay fp32); unset: from "
            "`accelerate launch`'s config, else no.",
            "choices": tuple(MIXED_PRECISION_DTYPES),
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the frozen weights (auto: follows the mixed precision).",
            "choices": ("auto", *DTYPE_NAMES),
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: the LLM decoder layers in 4-bit NF4 (bitsandbytes)."}
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute activations in the backward pass (LLM and CLIP layers, and the UNet): less memory, "
            "about 30%% more compute."
        },
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest sample in tokens (unset: the tokenizer's `model_max_length`)."}
    )
    i2t_probability: float = field(
        default=0.5, metadata={"help": "Chance that a pair is image-to-text rather than text-to-image."}
    )
    caption_dropout: float = field(
        default=0.0,
        metadata={"help": "Chance that a text-to-image pair loses its caption (the guidance unconditional)."},
    )
    data_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per `data` source: each batch then comes from one source, the sources taking these "
            "shares of the batches (`sampling.py`); unset: the sources mixed in proportion to their sizes.",
            "metavar": "W",
        },
    )
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flip of the diffusion pictures."})
    num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes."})
    checkpointing_steps: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint every N steps (0: never).", "metavar": "N"}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most N checkpoints (unset: all).", "metavar": "N"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "Resume from the latest complete checkpoint-* in `output_dir` (`latest`, or the flag alone), or "
            "from the checkpoint folder CHECKPOINT.",
            "nargs": "?",
            "const": "latest",
            "metavar": "CHECKPOINT",
        },
    )
    logging_steps: int = field(
        default=1, metadata={"help": "Append to train_log.jsonl every N steps (and at the last step).", "metavar": "N"}
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "Also log to these accelerate trackers (tensorboard, wandb, ...).", "action": "extend"},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})

    def __post_init__(self):
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [str(path) for path in self.data]
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to] if self.report_to not in ("", "none") else []
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION_DTYPES:
            raise ValueError(f"`mixed_precision` must be one of {sorted(MIXED_PRECISION_DTYPES)}.")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"`dtype` must be 'auto' or one of {list(DTYPE_NAMES)}; got {self.dtype!r}.")
        for name, (kind, optional) in ARGUMENT_RANGES.items():
            kind.check(name, getattr(self, name), optional=optional)
        self.stage = resolve_stage(self.stage)
        parts = self.trainable_parts()  # checks the modes
        if self.load_in_4bit and parts.language_model != "lora":
            raise ValueError(
                f"`load_in_4bit` (QLoRA) needs `language_model='lora'`, got {parts.language_model!r}: 4-bit weights "
                "can be adapted, not trained or kept frozen here."
            )
        if self.data_weights is not None:
            if isinstance(self.data_weights, (int, float)):
                self.data_weights = [self.data_weights]
            self.data_weights = [float(weight) for weight in self.data_weights]
            for index, weight in enumerate(self.data_weights):
                checks.NON_NEGATIVE_NUMBER.check(f"data_weights[{index}]", weight)  # 0 leaves a source out
            if not any(self.data_weights):
                raise ValueError(f"`data_weights` must have at least one weight > 0, got {self.data_weights}.")
            if len(self.data_weights) != len(self.data):
                raise ValueError(
                    f"`data_weights` has {len(self.data_weights)} weight(s) for {len(self.data)} data source(s); "
                    "give one weight per `data` source, in the same order."
                )

    def trainable_parts(self) -> TrainableParts:
        """What this run trains: the `stage` preset with this run's overrides."""
        return trainable_parts(
            self.stage,
            language_model=self.language_model,
            vision_tower=self.vision_tower,
            image_projector=self.train_image_projector,
            condition_projector=self.train_condition_projector,
            dream_queries=self.train_dream_queries,
            format_tokens=self.train_format_tokens,
        )

    def weight_dtype(self, mixed_precision: str | None = None) -> torch.dtype:
        """The frozen weights' dtype; "auto" follows `mixed_precision` (the one the accelerator runs with)."""
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        return MIXED_PRECISION_DTYPES[mixed_precision or self.mixed_precision or "no"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DreamLLMTrainingArguments":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown training option(s) {unknown}; known: {sorted(names)}.")
        return cls(**values)


@dataclass
class TrainOutput:
    """What `train` did: the last step, where things are, and the last logged record. `pipeline_dir` is the complete
    pipeline folder the run wrote (its `output_dir`), None for a LoRA run without `merge_lora`."""

    global_step: int
    output_dir: Path
    log_path: Path
    last_record: dict | None
    is_main_process: bool = True
    pipeline_dir: Path | None = None


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (`.yaml`/`.yml`) or JSON config file of `DreamLLMTrainingArguments` fields."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    return {key.replace("-", "_"): value for key, value in values.items()}


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder whose writing finished (its `trainer_state.json`, written last, is there)."""
    return (Path(path) / TRAINER_STATE_NAME).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-STEP` folders of `output_dir`, oldest step first (a folder without its completion
    marker, as a deletion cut short leaves, is not one)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    steps = [
        (int(path.name[len(CHECKPOINT_PREFIX) :]), path)
        for path in folder.iterdir()
        if path.name.startswith(CHECKPOINT_PREFIX)
        and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and is_complete_checkpoint(path)
    ]
    return [path for _, path in sorted(steps)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-STEP` folder with the largest STEP in `output_dir` (None when there is none)."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _remove_checkpoint(path: Path) -> None:
    """Deletes a checkpoint folder, its completion marker first: cut short, it is left incomplete, never taken."""
    (path / TRAINER_STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(path)


def _has_lm_targets(batch: dict) -> bool:
    """Whether the batch has a next-token target (a label after the first position that is not ignored)."""
    labels = batch.get("labels")
    return labels is not None and bool((labels[:, 1:] != IGNORE_INDEX).any())


def _trim_log(log_path: Path, last_step: int) -> None:
    """Drops log lines past `last_step` (written after the checkpoint a run resumes from)."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    log_path.write_text("".join(line + "\n" for line in kept))


def _noise_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of the diffusion noise of global micro-batch `batch_index` (on the CPU: the same numbers on any
    device)."""
    import numpy as np

    state = np.random.SeedSequence([seed, batch_index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _diffusion_resolution(unet, vae) -> int:
    return unet.config.sample_size * vae_scale_factor(vae.config)


def load_training_components(
    args: DreamLLMTrainingArguments, device: torch.device | None = None, dtype: torch.dtype | None = None
):
    """`(mllm, processor, unet, vae, noise_scheduler)` of `args.model`, the frozen weights in `dtype`
    (default `args.weight_dtype()`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ..decoder_conditioning import check_decoder
    from ..modeling import DreamLLMProcessor
    from .lora import load_mllm

    root = Path(args.model)
    for part in ("mllm", "processor", "unet", "vae", "scheduler"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"{root} is not a DreamLLM pipeline folder: {part}/ is missing (expected mllm/, processor/, unet/, "
                "vae/, scheduler/, as `dreamllm-hf convert`, `dreamllm-hf init` and a stage of `dreamllm-hf train` "
                "write)."
            )
    dtype = dtype or args.weight_dtype()
    device_map = None
    if args.load_in_4bit:  # bitsandbytes quantizes on the device the weights are loaded to: load them where they run
        device_map = {"": "cpu" if device is None or device.type == "cpu" else str(device)}
    mllm = load_mllm(root, dtype=dtype, load_in_4bit=args.load_in_4bit, device_map=device_map)
    processor = DreamLLMProcessor.from_pretrained(root / "processor")
    config = mllm.config
    processor.check_model_config(config)  # processor/ and mllm/ lay pictures out alike
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    check_decoder(unet.config, config, vae.config)  # before training starts: the width, and what else unet/ reads
    # The original trains with DDPM whatever the scheduler folder says (it loads SD's config into DDPMScheduler).
    noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(root / "scheduler"))
    return mllm, processor, unet, vae, noise_scheduler


def trained_parameters(mllm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `mllm` that train, by name (what a checkpoint of a run without LoRA holds)."""
    return {name: param.detach().contiguous() for name, param in mllm.named_parameters() if param.requires_grad}


def load_trained_parameters(mllm: torch.nn.Module, weights: dict[str, torch.Tensor], source) -> None:
    """Puts `trained_parameters` back in place; they must be exactly the parameters of `mllm` that train."""
    params = {name: param for name, param in mllm.named_parameters() if param.requires_grad}
    if weights.keys() != params.keys():
        missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise ValueError(
            f"{source} does not fit this run's trained parameters (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); resume with the options of the run that wrote it."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def _model_index(source: Path, mllm, processor) -> dict:
    """`model_index.json` as `DreamLLMPipeline.save_pretrained` writes it, from the classes of the two transformers
    components and those the diffusers components' folders in `source` record (nothing is loaded or built)."""
    import diffusers

    index = {"_class_name": "DreamLLMPipeline", "_diffusers_version": diffusers.__version__}
    for name, component in (("mllm", mllm), ("processor", processor)):
        index[name] = [type(component).__module__, type(component).__name__]
    for name, config_file in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        index[name] = ["diffusers", json.loads((source / name / config_file).read_text())["_class_name"]]
    return index


def write_pipeline_folder(
    output_dir: str | os.PathLike, source: str | os.PathLike, mllm, processor, state_dict=None
) -> Path:
    """
    A complete DreamLLM pipeline folder in `output_dir`: `mllm` saved to `mllm/` (with `state_dict` when given, as
    gathered from FSDP or DeepSpeed) with the `processor`'s files, so that it is a complete transformers repository,
    and `processor/`, `unet/`, `vae/`, `scheduler/` and `model_index.json` copied from the `source` folder (training
    leaves them as they are).
    """
    output_dir, source = Path(output_dir), Path(source)
    output_dir.mkdir(parents=True, exist_ok=True)
    mllm.save_pretrained(str(output_dir / MLLM_FOLDER), state_dict=state_dict)
    save_processor_with_model(processor, output_dir)  # as the pipelines' `save_pretrained` does
    for part in PIPELINE_PARTS:
        shutil.copytree(source / part, output_dir / part, dirs_exist_ok=True)
    if (source / "model_index.json").exists():
        shutil.copyfile(source / "model_index.json", output_dir / "model_index.json")
    else:  # a folder assembled by hand
        index = _model_index(source, mllm, processor)
        (output_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return output_dir


def train(args: DreamLLMTrainingArguments) -> TrainOutput:
    """Trains a DreamLLM on both losses, the parts `args` says (a paper stage, LoRA or full); see the module
    docstring."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import DreamLLMDataCollator, build_training_dataset
    from .lora import apply_lora, load_adapter, load_mllm
    from .losses import DreamLLMTrainingModel
    from .sampling import SourceMixtureBatchSampler
    from .sharding import (
        RowMask,
        check_deepspeed_settings,
        check_fsdp_settings,
        check_launch_settings,
        deepspeed_on_cpu_kwargs,
        describe_shards,
        enable_fsdp_on_cpu,
        frozen_parts,
        launched_processes,
    )
    from .stages import apply_trainable_parts

    if not args.model:
        raise ValueError("Give the DreamLLM folder to train (`model`).")
    if not args.data:
        raise ValueError("Give at least one data source (`data`).")
    output_dir = Path(args.output_dir)
    if output_dir.resolve() == Path(args.model).resolve():
        raise ValueError(f"`output_dir` ({output_dir}) is the `model` folder; write the run to another folder.")
    parts = args.trainable_parts()
    is_lora = parts.language_model == "lora"
    accumulation = check_launch_settings(args)  # before the Accelerator, which they decide, and anything else
    if accumulation != args.gradient_accumulation_steps:
        args = dataclasses.replace(args, gradient_accumulation_steps=accumulation)
    checkpoint = None
    if args.resume:
        checkpoint = find_latest_checkpoint(output_dir) if args.resume == "latest" else Path(args.resume)
        if checkpoint is not None and not is_complete_checkpoint(checkpoint):
            raise ValueError(
                f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE_NAME}: its writing was cut short); "
                "resume from a complete one, or with `--resume` alone for the latest complete one."
            )
    accelerator = Accelerator(
        # Without a GPU, processes started by `accelerate launch`/torchrun join a gloo group on the CPU.
        **{"cpu": not torch.accelerator.is_available(), **deepspeed_on_cpu_kwargs()},
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if args.global_batch_size is not None and accelerator.num_processes != launched_processes():
        raise RuntimeError(
            f"`global_batch_size` was split for {launched_processes()} process(es) (WORLD_SIZE), but the run has "
            f"{accelerator.num_processes}: launch with `accelerate launch` or torchrun."
        )
    enable_fsdp_on_cpu(accelerator)
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    if is_fsdp:  # before anything loads
        check_fsdp_settings(accelerator.state.fsdp_plugin, args.model, parts)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        check_deepspeed_settings(accelerator.state.deepspeed_plugin)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / TRAINING_ARGS_NAME).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    log_path = output_dir / TRAIN_LOG_NAME

    # The same seed on every process for everything that must agree (adapter init); per process for the noise below.
    set_seed(args.seed)
    weight_dtype = args.weight_dtype(accelerator.mixed_precision)
    mllm, processor, unet, vae, noise_scheduler = load_training_components(args, accelerator.device, weight_dtype)
    partially_trained = []  # parameters of which only some rows train (kept out of weight decay)
    if is_lora:
        mllm = apply_lora(
            mllm,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            lora_lm_head=args.lora_lm_head,
            train_format_tokens=parts.format_tokens,
            train_modules=parts.fully_trained_modules(mllm.config),
            activation_checkpointing=args.activation_checkpointing,
        )
    else:
        if args.activation_checkpointing:
            mllm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        partially_trained = apply_trainable_parts(mllm, parts)
    if args.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    model = DreamLLMTrainingModel(mllm, unet, vae, noise_scheduler, args.loss_weight_lm, args.loss_weight_vm)
    model.unet.to(accelerator.device)
    model.vae.to(accelerator.device)

    dataset = build_training_dataset(
        args.data,
        processor,
        diffusion_resolution=_diffusion_resolution(unet, vae),
        max_length=args.max_length,
        i2t_probability=args.i2t_probability,
        random_flip=args.random_flip,
        seed=args.seed,
        cache_dir=args.cache_dir,
        caption_dropout=args.caption_dropout,
    )
    collator = DreamLLMDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    mixture = None
    if args.data_weights is not None:
        mixture = SourceMixtureBatchSampler(
            [len(source) for source in dataset.sources], args.data_weights, args.per_device_batch_size, args.seed
        )
        batching = {"batch_sampler": mixture}
    else:
        batching = {"batch_size": args.per_device_batch_size, "shuffle": True}
    dataloader = torch.utils.data.DataLoader(
        dataset,
        collate_fn=collator,
        num_workers=args.num_workers,
        # Its own generator: creating a data-loader iterator then draws nothing from the global RNG, which the
        # diffusion noise uses, so a resumed run (a new iterator mid-epoch) draws the same noise as an unbroken one.
        generator=torch.Generator().manual_seed(args.seed),
        **batching,
    )
    trainable = [param for param in model.parameters() if param.requires_grad]
    partial_ids = {id(param) for param in partially_trained}
    param_groups = [{"params": [param for param in trainable if id(param) not in partial_ids]}]
    if partially_trained:  # weight decay would move the rows that do not train
        param_groups.append({"params": partially_trained, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    # A prepared scheduler steps once per process per optimizer step (accelerate's convention).
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_steps * accelerator.num_processes,
    )
    row_mask = None
    if is_fsdp:
        unsharded = frozen_parts(model)
        accelerator.state.fsdp_plugin.ignored_modules = unsharded
        # `fully_shard` replaces the parameters, and with them the row-mask hooks of `apply_trainable_parts`.
        masked_names = [name for name, param in model.named_parameters() if id(param) in partial_ids]
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if is_fsdp:
        accelerator.print(describe_shards(model, unsharded))
        if partially_trained:
            rows = format_token_ids(accelerator.unwrap_model(model).mllm.config)
            row_mask = RowMask(RowMask.find(model, masked_names), rows)
    engine_saves_model = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_trained_hook(models, weights, checkpoint_dir):
        # Checkpoints hold what trains (the adapter, or the trained parameters), not the frozen multi-GB rest (FSDP
        # and DeepSpeed save through their engines).
        if engine_saves_model:
            return
        if accelerator.is_main_process:
            for wrapped in models:
                inner = accelerator.unwrap_model(wrapped).mllm
                if is_lora:
                    inner.save_pretrained(checkpoint_dir)
                else:
                    weights_cpu = {name: value.cpu() for name, value in trained_parameters(inner).items()}
                    save_file(weights_cpu, os.path.join(checkpoint_dir, TRAINED_WEIGHTS_NAME))
        while weights:
            weights.pop()

    def load_trained_hook(models, checkpoint_dir):
        if engine_saves_model:
            return
        name = "adapter_model.safetensors" if is_lora else TRAINED_WEIGHTS_NAME
        saved = load_file(os.path.join(checkpoint_dir, name))
        while models:
            inner = accelerator.unwrap_model(models.pop()).mllm
            if not is_lora:
                load_trained_parameters(inner, saved, checkpoint_dir)
                continue
            result = set_peft_model_state_dict(inner, saved)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Checkpoint {checkpoint_dir} does not fit the adapter: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_trained_hook)
    accelerator.register_load_state_pre_hook(load_trained_hook)

    global_step = 0
    if args.resume:
        if checkpoint is None:
            logger.warning("No checkpoint in %s to resume from; starting from scratch.", output_dir)
        else:
            # DeepSpeed checkpoints are written without the frozen weights (see save_checkpoint): load non-strictly.
            load_kwargs = {"load_module_strict": False} if is_deepspeed else {}
            accelerator.load_state(str(checkpoint), **load_kwargs)
            global_step = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["global_step"]
            accelerator.print(f"Resumed from {checkpoint} at step {global_step}.")
            if accelerator.is_main_process:
                _trim_log(log_path, global_step)
    if not args.resume or global_step == 0:
        set_seed(args.seed, device_specific=True)  # dropout; the diffusion noise has its own generators (below)
        if accelerator.is_main_process and log_path.exists():
            log_path.unlink()
    if args.report_to:
        accelerator.init_trackers("dreamllm-lora", config={k: str(v) for k, v in args.to_dict().items()})

    steps_per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def save_checkpoint(step: int) -> None:
        checkpoint_dir = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        partial_dir = checkpoint_dir.with_name(checkpoint_dir.name + PARTIAL_CHECKPOINT_SUFFIX)
        if accelerator.is_main_process and partial_dir.exists():  # left by a run killed while writing it
            shutil.rmtree(partial_dir)
        accelerator.wait_for_everyone()
        save_kwargs = {"exclude_frozen_parameters": True} if is_deepspeed else {}
        accelerator.save_state(str(partial_dir), **save_kwargs)
        accelerator.wait_for_everyone()  # every process's shards and RNG states are written
        if accelerator.is_main_process:
            state = {"global_step": step, "epoch": epoch, "num_processes": accelerator.num_processes}
            (partial_dir / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
            if checkpoint_dir.exists():  # from an earlier run (resumed from an older step) or left incomplete
                _remove_checkpoint(checkpoint_dir)
            partial_dir.rename(checkpoint_dir)  # atomic: the checkpoint appears complete or not at all
            if args.checkpoints_total_limit:
                for old in complete_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                    _remove_checkpoint(old)
        accelerator.wait_for_everyone()

    model.train()
    progress = tqdm(
        total=args.max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    # Per term (loss, lm_loss, vm_loss): the sum over the micro-batches that had it, and how many did. A batch without
    # language-model targets (text-to-image pairs) or without pictures to draw has no such term: it is not averaged in
    # as 0, and a term no micro-batch of any process had is logged as null.
    sums = torch.zeros(3, device=accelerator.device)
    counts = torch.zeros(3, device=accelerator.device)
    skipped = torch.zeros((), device=accelerator.device)  # pictures of documents that could not be opened
    last_record = None
    num_processes, rank = accelerator.num_processes, accelerator.process_index
    micro_step = 0  # micro-batches of the optimizer step under way
    started = time.perf_counter()
    while global_step < args.max_steps:
        dataset.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        if mixture is not None:  # under several processes accelerate wraps it and does not reach it
            mixture.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        for batch in batches:
            skipped_here = batch.pop("skipped_pictures", None)
            if skipped_here is not None:
                skipped += skipped_here.to(skipped.device).float()
            with accelerator.accumulate(model):
                # The noise of a micro-batch depends on which batch of the global order it is, not on the process
                # that draws it: 1 process accumulating N micro-batches draws what N processes draw in one.
                batch_index = (global_step * args.gradient_accumulation_steps + micro_step) * num_processes + rank
                out = model(**batch, generator=_noise_generator(args.seed, batch_index))
                micro_step += 1
                accelerator.backward(out.loss)
                if row_mask is not None and accelerator.sync_gradients:
                    row_mask.apply()
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            present = torch.tensor([1.0, _has_lm_targets(batch), out.diffusion is not None], device=sums.device)
            terms = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.vm_loss.detach()]).float()
            sums += torch.where(present > 0, terms, 0.0)  # a term a batch had stays as it is, NaN included
            counts += present
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            micro_step = 0
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == args.max_steps:
                totals = accelerator.reduce(torch.cat([sums, counts, skipped[None]]), reduction="sum").tolist()
                means = [float(s / c) if c > 0 else None for s, c in zip(totals[:3], totals[3:6])]
                last_record = {
                    "step": global_step,
                    "loss": means[0],
                    "lm_loss": means[1],
                    "vm_loss": means[2],
                    "lr": lr_scheduler.get_last_lr()[0],
                    "epoch": epoch,
                    "skipped_pictures": int(totals[6]),
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
                sums.zero_()
                counts.zero_()
                skipped.zero_()
                if accelerator.is_main_process:
                    with log_path.open("a") as log:
                        log.write(json.dumps(last_record) + "\n")
                names = ("loss", "lm", "vm")
                shown = {name: "-" if value is None else f"{value:.4f}" for name, value in zip(names, means)}
                progress.set_postfix(**shown, lr=f"{last_record['lr']:.2e}")
                if args.report_to:
                    logged = {k: v for k, v in last_record.items() if k != "step" and v is not None}
                    accelerator.log(logged, step=global_step)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(global_step)
            if global_step >= args.max_steps:
                break
        else:
            epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    pipeline_dir = output_dir if not is_lora or args.merge_lora else None
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).mllm
        prefix = "mllm."
        mllm_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_lora:
            inner.save_pretrained(str(output_dir), state_dict=mllm_state)
            if (
                args.merge_lora
            ):  # onto a freshly loaded base (not 4-bit): also right after QLoRA, and under FSDP/DeepSpeed
                merged = load_adapter(load_mllm(args.model, dtype=weight_dtype), output_dir, merge=True)
                write_pipeline_folder(output_dir, args.model, merged, processor)
        else:
            write_pipeline_folder(output_dir, args.model, inner, processor, state_dict=mllm_state)
        state = {"global_step": global_step, "epoch": epoch, "num_processes": accelerator.num_processes}
        (output_dir / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainOutput(
        global_step=global_step,
        output_dir=output_dir,
        log_path=log_path,
        last_record=last_record,
        is_main_process=accelerator.is_main_process,
        pipeline_dir=pipeline_dir,
    )


__all__ = [
    "DreamLLMTrainingArguments",
    "TrainOutput",
    "find_latest_checkpoint",
    "load_trained_parameters",
    "load_training_components",
    "read_config_file",
    "train",
    "trained_parameters",
    "write_pipeline_folder",
]
