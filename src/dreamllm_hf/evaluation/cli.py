"""`dreamllm-hf evaluate fid|captions|vqa|shapes-data`: the paper's evaluation protocols as commands.

* `fid`: pictures for captions (one per seed, resumable, data parallel under `accelerate launch`), the best by CLIP
  score when several seeds are given, then FID against reference statistics or pictures, and CLIP score.
* `captions`: the model's captions of pictures scored with pycocoevalcap (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE).
* `vqa`: the model's answers scored with the VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz, JSON Lines).
* `shapes-data`: the same inputs in the shapes world, and a small CLIP, for the shipped demo model.

Every command prints progress on stderr; the last line of stdout is one JSON object with the scores and the exact
settings, also written as `scores.json` in the output folder.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checks
from ..checks import usage_error
from ..dtypes import DTYPE_NAMES, parse_dtype


DEMO_MODEL = "demo"  # --model demo: the shipped demo model
SCORES_FILE = "scores.json"  # the figures of every command, beside its other outputs


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `evaluate` and its sub-commands to an `argparse` sub-parser group."""
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's evaluations: zero-shot FID with CLIP selection, caption scores, VQA accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="evaluation", required=True, metavar="{fid,captions,vqa,shapes-data}")
    _add_fid_parser(commands)
    _add_captions_parser(commands)
    _add_vqa_parser(commands)
    _add_shapes_parser(commands)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Options shared by the commands


def _add_model_options(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument(
        "--model", default=None, help=f"a saved DreamLLM pipeline folder, or `{DEMO_MODEL}` for the shipped demo model"
    )
    parser.add_argument(
        "--batch-size",
        type=checks.BATCH_SIZE.parse,
        default=batch_size,
        help="prompts per pipeline call in each process",
    )
    parser.add_argument(
        "--device", default=None, help="cuda, cpu, ... (default: the device accelerate gives the process)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="compute dtype (default: float16 on cuda, float32 on cpu)",
    )


def _add_answer_options(parser: argparse.ArgumentParser, prompt: str, max_new_tokens: int) -> None:
    _add_model_options(parser, batch_size=16)
    parser.add_argument("--images", type=Path, default=None, help="the folder of the pictures (COCO/VQA files)")
    parser.add_argument("--prompt", default=prompt, help=f"the model's prompt (default: {prompt!r})")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the model's chat template (--no-chat-template: give it as it is, with <image>)",
    )
    parser.add_argument(
        "--max-new-tokens", type=checks.MAX_NEW_TOKENS.parse, default=max_new_tokens, help="tokens the model may write"
    )
    parser.add_argument(
        "--answers", type=Path, default=None, help="score this results file instead of running a model"
    )
    parser.add_argument(
        "--limit",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="only the first N entries of --data (a smoke test)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="where the answers and scores.json go")


def _model_path(model: str | None) -> str:
    if model is None:
        raise SystemExit("error: give --model DIR (a saved DreamLLM pipeline folder, or `demo`).")
    if model == DEMO_MODEL:
        from ..shapes_world.demo_model_path import DEMO_MODEL_PATH

        return str(DEMO_MODEL_PATH)
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"error: --model {model} has no model_index.json; give a folder written by `dreamllm-hf convert` or "
            "`DreamLLMPipeline.save_pretrained`, or `demo`."
        )
    return model


def _accelerator(device: str | None):
    from accelerate import Accelerator

    # Without a GPU, processes started by `accelerate launch`/torchrun join a gloo group on the CPU.
    return Accelerator(cpu=not torch.accelerator.is_available() or device == "cpu")


def _device_and_dtype(args, accelerator) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device) if args.device else accelerator.device
    dtype = (
        parse_dtype(args.dtype, "--dtype")
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    return device, dtype


def _finish(result: dict, output_dir: Path) -> int:
    """Writes `scores.json` and prints the same JSON as the last line of stdout."""
    from ..pipelines.prompt_files import write_atomically

    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, ensure_ascii=False)
    write_atomically(output_dir / SCORES_FILE, lambda path: path.write_text(text + "\n", encoding="utf-8"))
    print(f"wrote {output_dir / SCORES_FILE}", file=sys.stderr)
    print(text, flush=True)
    return 0


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# --------------------------------------------------------------------------------------------------------------------
# fid


def _add_fid_parser(commands) -> None:
    from ..pipelines.cli import add_picture_size_options
    from .features import INCEPTION_HELP
    from .text_to_image import DEFAULT_SEEDS, PAPER_GUIDANCE, PAPER_RESOLUTION, PAPER_SEEDS, PAPER_STEPS

    parser = commands.add_parser(
        "fid",
        help="zero-shot FID (and CLIP score) of text-to-image, with CLIP selection among seeds",
        description=(
            "For every caption one picture per seed (DreamLLMText2ImagePipeline, batched; resumable; data parallel "
            "under `accelerate launch`), the best by CLIP score when several seeds are given, then FID against "
            f"--reference. The paper's MS-COCO row: --seeds {PAPER_SEEDS} --select-with CLIP-ViT-L/14 (the defaults "
            f"are its {PAPER_STEPS} steps, guidance {PAPER_GUIDANCE} and {PAPER_RESOLUTION} px)."
        ),
    )
    _add_model_options(parser, batch_size=8)
    parser.add_argument(
        "--captions",
        type=Path,
        default=None,
        help='COCO\'s captions_val2014.json, JSON Lines of {"caption": ...} (other keys kept as ids), or a '
        "`datasets` dataset with a caption column",
    )
    parser.add_argument(
        "--num-captions", type=checks.POSITIVE_INT.parse, default=None, help="a random sample of this many captions"
    )
    parser.add_argument(
        "--caption-sample-seed", type=checks.SEED.parse, default=0, help="seeds that sample (default 0)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="reference statistics (.npz with mu and sigma, as pytorch-fid writes them) or a folder of pictures",
    )
    parser.add_argument(
        "--seeds", default=DEFAULT_SEEDS, help=f"one picture per caption for each seed: 42, {PAPER_SEEDS} or 0,3,7"
    )
    parser.add_argument(
        "--select-with",
        type=Path,
        default=None,
        metavar="CLIP_DIR",
        help="a local CLIP folder; with several seeds it keeps, per caption, the picture it scores best",
    )
    parser.add_argument(
        "--clip-model",
        type=Path,
        default=None,
        metavar="CLIP_DIR",
        help="the CLIP of the reported CLIP score (default: --select-with; none: no CLIP score)",
    )
    parser.add_argument("--steps", type=checks.STEPS.parse, default=PAPER_STEPS, help="denoising steps per picture")
    parser.add_argument(
        "--guidance", type=checks.GUIDANCE_SCALE.parse, default=PAPER_GUIDANCE, help="classifier-free guidance scale"
    )
    parser.add_argument("--negative-prompt", default=None, help="what the unconditional branch reads instead of ''")
    add_picture_size_options(parser)
    parser.add_argument(
        "--resolution",
        type=checks.POSITIVE_INT.parse,
        default=PAPER_RESOLUTION,
        help="FID compares pictures centre-cropped and resized to this square (both sets)",
    )
    parser.add_argument("--inception-weights", type=Path, default=None, metavar="FILE", help=INCEPTION_HELP)
    parser.add_argument(
        "--feature-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="a transformers vision model folder (e.g. CLIP) as the feature network instead (FID-CLIP)",
    )
    parser.add_argument(
        "--generated",
        type=Path,
        default=None,
        help="score these pictures instead of drawing: a folder, or a metadata JSON Lines of file_name/caption "
        "such as a previous run's selected.jsonl",
    )
    parser.add_argument(
        "--save-reference-stats",
        type=Path,
        default=None,
        metavar="FILE",
        help="with a folder as --reference: also save its statistics as a pytorch-fid .npz for later runs",
    )
    parser.add_argument(
        "--score-batch-size", type=checks.BATCH_SIZE.parse, default=50, help="pictures per feature-network call"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="where the pictures and scores.json go")
    parser.set_defaults(func=run_fid, parser=parser)


def _check_fid_arguments(args) -> None:
    from .features import INCEPTION_HELP

    if (args.inception_weights is None) == (args.feature_model is None):
        raise SystemExit(
            f"error: give --inception-weights FILE ({INCEPTION_HELP}) or --feature-model DIR (a transformers vision "
            "model such as CLIP, for FID-CLIP); exactly one of them."
        )
    if args.inception_weights is not None and not args.inception_weights.is_file():
        raise SystemExit(f"error: --inception-weights {args.inception_weights} does not exist; give {INCEPTION_HELP}.")
    if not args.reference.exists():
        raise SystemExit(f"error: --reference {args.reference} does not exist.")
    if args.save_reference_stats is not None and not args.reference.is_dir():
        raise SystemExit("error: --save-reference-stats needs a folder of pictures as --reference.")
    for name in ("select_with", "clip_model", "feature_model"):
        folder = getattr(args, name)
        if folder is not None and not (folder / "config.json").is_file():
            raise SystemExit(f"error: --{name.replace('_', '-')} {folder} is not a model folder (no config.json).")
    if args.generated is not None:
        conflicting = [name for name in ("model", "captions", "select_with") if getattr(args, name) is not None]
        if conflicting:
            raise SystemExit(
                f"error: --generated scores pictures that exist; drop --{conflicting[0].replace('_', '-')} "
                "(selection happens when drawing several seeds)."
            )
        if not args.generated.exists():
            raise SystemExit(f"error: --generated {args.generated} does not exist.")
        return
    if args.captions is None or args.output_dir is None:
        raise SystemExit("error: give --model DIR --captions FILE --output-dir DIR (or --generated DIR to score).")


def _fid_settings(args, model: str, records) -> dict:
    from .text_to_image import captions_digest

    return {
        "model": model,
        "captions": str(args.captions),
        "captions_digest": captions_digest(records),
        "num_captions": len(records),
        "caption_sample_seed": args.caption_sample_seed if args.num_captions else None,
        "steps": args.steps,
        "guidance": args.guidance,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
    }


def run_fid(args) -> int:
    from ..pipelines.cli import check_picture_size
    from .data import parse_seeds, read_captions

    _check_fid_arguments(args)
    if args.generated is not None:
        return _score_fid(args, None, None, None, {}, {})
    seeds = parse_seeds(args.seeds)
    if len(seeds) > 1 and args.select_with is None:
        raise SystemExit(
            f"error: --seeds {args.seeds} draws {len(seeds)} pictures per caption; give --select-with CLIP_DIR to keep "
            "the best of them (the paper's protocol), or one seed."
        )
    model = _model_path(args.model)
    check_picture_size(args, model)
    records = read_captions(args.captions, args.num_captions, args.caption_sample_seed)
    return _draw_and_score(args, model, seeds, records)


def _draw_and_score(args, model: str, seeds: list[int], records) -> int:
    from ..pipelines import DreamLLMText2ImagePipeline
    from .text_to_image import check_generation_settings, draw_pictures, pending_jobs, picture_jobs

    output_dir: Path = args.output_dir
    generation = _fid_settings(args, model, records)
    accelerator = _accelerator(args.device)
    if accelerator.is_main_process:  # records the settings, or exits when the folder holds other ones
        output_dir.mkdir(parents=True, exist_ok=True)
        check_generation_settings(output_dir, generation)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        check_generation_settings(output_dir, generation)
    jobs = picture_jobs(records, seeds)
    pending = pending_jobs(jobs, output_dir)
    # Every process lists the missing pictures before any of them draws one, so all split the same list.
    accelerator.wait_for_everyone()

    started = time.perf_counter()
    device, dtype = _device_and_dtype(args, accelerator)
    if pending:
        pipe = DreamLLMText2ImagePipeline.from_pretrained(model, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        with accelerator.split_between_processes(pending) as share:
            with tqdm(
                total=len(share), desc="pictures", unit="pic", disable=not accelerator.is_local_main_process
            ) as bar:
                try:
                    draw_pictures(
                        pipe,
                        share,
                        output_dir,
                        args.batch_size,
                        on_batch=bar.update,
                        num_inference_steps=args.steps,
                        guidance_scale=args.guidance,
                        negative_prompt=args.negative_prompt,
                        height=args.height,
                        width=args.width,
                    )
                except ValueError as error:  # refused by the pipeline's `check_inputs`, before its model work
                    usage_error(args, str(error))
            print(
                f"process {accelerator.process_index}/{accelerator.num_processes}: drew {len(share)} picture(s)",
                file=sys.stderr,
            )
        del pipe
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    generation_seconds = time.perf_counter() - started
    print(f"{len(pending)} picture(s) drawn, {len(jobs) - len(pending)} already there", file=sys.stderr)
    settings = {
        **generation,
        "seeds": seeds,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "processes": accelerator.num_processes,
    }
    timings = {"generation_s": round(generation_seconds, 1), "pictures_drawn": len(pending)}
    return _score_fid(args, records, seeds, device, settings, timings)


def _score_fid(args, records, seeds, device, settings: dict, timings: dict) -> int:
    from .clip_score import CLIPScorer
    from .data import open_pictures
    from .features import load_feature_network
    from .fid import FIDScorer, load_reference, save_statistics
    from .text_to_image import SELECTION_FILE, read_generated, select_pictures

    started = time.perf_counter()
    device = device or torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clip_folder = args.clip_model or args.select_with
    clip = CLIPScorer(clip_folder, device=device) if clip_folder is not None else None
    if records is not None:
        rows = select_pictures(records, seeds, args.output_dir, clip if args.select_with is not None else None)
        files = [args.output_dir / row["file_name"] for row in rows]
        captions = [row["caption"] for row in rows]
        output_dir = args.output_dir
    else:
        files, captions = read_generated(args.generated)
        output_dir = args.output_dir or (args.generated if args.generated.is_dir() else args.generated.parent)
        if clip is not None and captions is None:
            raise SystemExit(
                f"error: a CLIP score needs the caption of every picture: give --generated a metadata file "
                f"(file_name, caption per line, e.g. {SELECTION_FILE}) instead of {args.generated}."
            )

    network, network_name = load_feature_network(args.inception_weights, args.feature_model)
    scorer = FIDScorer(network, resolution=args.resolution, batch_size=args.score_batch_size, device=device)
    reference = load_reference(scorer, args.reference)
    if args.save_reference_stats is not None:
        mu, sigma, count = scorer.statistics(real=True)
        save_statistics(
            args.save_reference_stats, mu, sigma, feature_network=network_name, resolution=args.resolution, count=count
        )
        print(f"saved the reference statistics to {args.save_reference_stats}", file=sys.stderr)
    scorer.add_generated(open_pictures(files), total=len(files))
    fid = scorer.compute()
    clip_score = clip.mean_score(list(open_pictures(files)), captions) if clip is not None else None
    timings["scoring_s"] = round(time.perf_counter() - started, 1)

    result = {
        "task": "fid",
        "fid": _rounded(fid),
        "clip_score": _rounded(clip_score),
        "feature_network": network_name,
        "resolution": args.resolution,
        "pictures": len(files),
        "selection": "clip" if seeds is not None and len(seeds) > 1 else None,
        **reference,
        "settings": {
            **settings,
            "generated": str(args.generated) if args.generated is not None else None,
            "select_with": str(args.select_with) if args.select_with else None,
            "clip_model": str(clip_folder) if clip_folder else None,
            "inception_weights": str(args.inception_weights) if args.inception_weights else None,
            "feature_model": str(args.feature_model) if args.feature_model else None,
        },
        "timings": timings,
    }
    return _finish(result, output_dir)


# --------------------------------------------------------------------------------------------------------------------
# captions and vqa: the model's answers


def _write_model_answers(args, model: str, examples, prompt: str, output_dir: Path) -> list[str] | None:
    """The model's text for every example (main process), None in the other processes."""
    from ..pipelines import DreamLLMPipeline
    from .answering import ANSWERS_DIR, pending_records, prompt_records, read_written_answers, write_answers

    answers_dir = output_dir / ANSWERS_DIR
    records = prompt_records(examples, prompt)
    pending = pending_records(records, answers_dir)
    accelerator = _accelerator(args.device)
    (answers_dir / "records").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    device, dtype = _device_and_dtype(args, accelerator)
    if pending:
        pipe = DreamLLMPipeline.from_pretrained(model, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        with (
            accelerator.split_between_processes(pending) as share,
            tqdm(total=len(share), desc="answers", unit="doc", disable=not accelerator.is_local_main_process) as bar,
        ):
            write_answers(
                pipe,
                share,
                answers_dir,
                args.batch_size,
                bar,
                allow_images=False,
                use_chat_template=args.chat_template,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    print(f"{len(pending)} answer(s) written, {len(records) - len(pending)} already there", file=sys.stderr)
    return read_written_answers(answers_dir, len(records))


def _answers(args, examples, key: str, field: str) -> tuple[list[str] | None, Path, dict]:
    """The texts to score (from --answers or the model), the output folder and the generation settings."""
    if args.answers is not None:
        if args.model is not None:
            raise SystemExit("error: give --model to run the model, or --answers FILE to score answers; not both.")
        texts = _read_answers(args, examples, key, field)
        return texts, args.output_dir or args.answers.parent, {"answers": str(args.answers)}
    if args.output_dir is None:
        raise SystemExit("error: give --output-dir DIR (where the model's answers and scores.json go).")
    model = _model_path(args.model)
    texts = _write_model_answers(args, model, examples, args.prompt, args.output_dir)
    settings = {
        "model": model,
        "prompt": args.prompt,
        "chat_template": args.chat_template,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
    }
    return texts, args.output_dir, settings


def _limited(examples: list, limit: int | None) -> list:
    return examples if limit is None else examples[:limit]


def _read_answers(args, examples, key, field):
    from .answering import read_answer_file

    return read_answer_file(args.answers, examples, key, field)


def _write_results(output_dir: Path, rows: list[dict]) -> None:
    from ..pipelines.prompt_files import write_atomically

    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, ensure_ascii=False)
    write_atomically(output_dir / "results.json", lambda path: path.write_text(text + "\n", encoding="utf-8"))


def _add_captions_parser(commands) -> None:
    from .answering import DEFAULT_CAPTION_PROMPT
    from .captions import CAPTION_METRICS

    parser = commands.add_parser(
        "captions",
        help="caption scores (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE) of the model's captions, via pycocoevalcap",
        description=(
            "Captions every picture of --data with the model (greedy, text only; resumable, data parallel), writes "
            "results.json in COCO's results format and scores it against the references with pycocoevalcap "
            "(Java needed; SPICE reported unavailable when its Stanford CoreNLP models are missing)."
        ),
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help='a COCO caption file (with --images), JSON Lines of {"image", "references"} or a dataset',
    )
    parser.add_argument(
        "--metrics", default=",".join(CAPTION_METRICS), help=f"comma-separated, of {', '.join(CAPTION_METRICS)}"
    )
    _add_answer_options(parser, DEFAULT_CAPTION_PROMPT, max_new_tokens=30)
    parser.set_defaults(func=run_captions, parser=parser)


def run_captions(args) -> int:
    from .answering import answer_key, results_rows
    from .captions import CAPTION_METRICS, score_captions
    from .data import read_captioning_examples

    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in CAPTION_METRICS]
    if unknown or not metrics:
        raise SystemExit(f"error: --metrics {args.metrics!r}: choose from {', '.join(CAPTION_METRICS)}.")
    examples = _limited(read_captioning_examples(args.data, args.images), args.limit)
    key = answer_key(examples, None)
    texts, output_dir, settings = _answers(args, examples, key, "caption")
    if texts is None:
        return 0
    _write_results(output_dir, results_rows(examples, texts, key, "caption"))
    scored = score_captions(
        {example.index: example.references for example in examples},
        {example.index: text for example, text in zip(examples, texts)},
        metrics,
    )
    result = {
        "task": "captions",
        **{name: _rounded(value, 2) for name, value in scored["scores"].items()},
        "unavailable": scored["unavailable"],
        "count": scored["count"],
        "examples": [
            {"caption": text, "references": example.references[:2]} for example, text in zip(examples[:3], texts)
        ],
        "settings": {"data": str(args.data), "metrics": metrics, **settings},
    }
    return _finish(result, output_dir)


def _add_vqa_parser(commands) -> None:
    from .answering import DEFAULT_VQA_PROMPT

    parser = commands.add_parser(
        "vqa",
        help="VQA accuracy of the model's answers (VQAv2, OK-VQA, TextVQA, VizWiz or JSON Lines)",
        description=(
            "Answers every question of --data with the model (greedy, text only; resumable, data parallel), writes "
            "results.json in the format's submission layout and scores the answers with the VQA accuracy "
            "(min(#annotators / 3, 1) over the ten leave-one-out subsets, answers normalised as the VQA evaluation "
            "describes). Test splits without answers only get results.json, for the evaluation server."
        ),
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="VQAv2/OK-VQA questions JSON (with --annotations), TextVQA JSON, VizWiz JSON, JSON Lines of "
        '{"image", "question", "answers"} or a dataset',
    )
    parser.add_argument("--annotations", type=Path, default=None, help="VQAv2/OK-VQA: the annotations JSON")
    parser.add_argument(
        "--image-template",
        default=None,
        help="picture file name from a question's fields, e.g. 'COCO_val2014_{image_id:012d}.jpg' (default: the "
        "format's)",
    )
    _add_answer_options(parser, DEFAULT_VQA_PROMPT, max_new_tokens=10)
    parser.set_defaults(func=run_vqa, parser=parser)


def run_vqa(args) -> int:
    from ..pipelines.prompt_files import write_atomically
    from .answering import answer_key, results_rows
    from .vqa import normalize_answer, read_vqa_examples, score_answers, vqa_accuracy

    examples, format_name, format_key = read_vqa_examples(
        args.data, args.images, args.annotations, args.image_template
    )
    examples = _limited(examples, args.limit)
    key = answer_key(examples, format_key)
    texts, output_dir, settings = _answers(args, examples, key, "answer")
    if texts is None:
        return 0
    _write_results(output_dir, results_rows(examples, texts, key, "answer"))
    per_question = [
        {
            key: row[key],
            "question": example.question,
            "answer": text,
            "normalized": normalize_answer(text),
            "accuracy": vqa_accuracy(text, example.references) if example.references else None,
        }
        for example, text, row in zip(examples, texts, results_rows(examples, texts, key, "answer"))
    ]
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in per_question)
    write_atomically(output_dir / "per_question.jsonl", lambda path: path.write_text(lines, encoding="utf-8"))
    scored = score_answers(examples, texts)
    result = {
        "task": "vqa",
        "format": format_name,
        "accuracy": _rounded(scored["accuracy"], 2),
        "scored": scored["scored"],
        "without_annotations": scored["unanswered_by_annotators"],
        "examples": [{"question": row["question"], "answer": row["answer"]} for row in per_question[:3]],
        "settings": {
            "data": str(args.data),
            "annotations": str(args.annotations) if args.annotations else None,
            **settings,
        },
    }
    return _finish(result, output_dir)


# --------------------------------------------------------------------------------------------------------------------
# shapes-data


def _add_shapes_parser(commands) -> None:
    parser = commands.add_parser(
        "shapes-data",
        help="the evaluation inputs in the shapes world (captions, reference pictures, captioning/VQA sets, a CLIP)",
        description=(
            "Writes captions.jsonl, reference/, drawn/, captioning.jsonl, vqa.jsonl (with pictures/) and clip/ (a "
            "small CLIP trained here in seconds) into --output-dir: what `evaluate fid|captions|vqa` need to run "
            "offline against the shipped demo model (--model demo)."
        ),
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--num-captions", type=checks.POSITIVE_INT.parse, default=96, help="captions to draw (the 12 in turn)"
    )
    parser.add_argument(
        "--num-reference",
        type=checks.NumberRange(integer=True, minimum=2).parse,
        default=480,
        help="reference pictures (at least 2: FID needs two)",
    )
    parser.add_argument(
        "--num-pictures", type=checks.POSITIVE_INT.parse, default=48, help="pictures to caption (two questions each)"
    )
    parser.add_argument(
        "--clip-steps", type=checks.POSITIVE_INT.parse, default=300, help="training steps of the small CLIP"
    )
    parser.add_argument("--seed", type=checks.SEED.parse, default=0)
    parser.set_defaults(func=run_shapes_data, parser=parser)


def run_shapes_data(args) -> int:
    from .shapes import write_shapes_benchmark

    started = time.perf_counter()
    paths = write_shapes_benchmark(
        args.output_dir,
        args.num_captions,
        args.num_reference,
        args.num_pictures,
        args.clip_steps,
        args.seed,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(
        json.dumps(
            {
                "task": "shapes-data",
                **{k: str(v) for k, v in paths.items()},
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


__all__ = ["add_evaluate_parser", "run_captions", "run_fid", "run_shapes_data", "run_vqa"]


if __name__ == "__main__":
    sys.exit(main())
