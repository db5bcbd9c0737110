"""The metrics of `dreamllm-hf evaluate` behave: FID, CLIP selection, VQA accuracy and normalisation, caption scores,
and the input readers. Everything is built here, offline: shapes-world pictures and a small CLIP trained on them."""

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from dreamllm_hf.evaluation.clip_score import CLIPScorer, select_best
from dreamllm_hf.evaluation.data import parse_seeds, read_captions
from dreamllm_hf.evaluation.features import InceptionFeatures, TransformersImageFeatures, pictures_to_uint8
from dreamllm_hf.evaluation.fid import FIDScorer, load_reference, load_statistics, save_statistics
from dreamllm_hf.evaluation.text_to_image import picture_seed
from dreamllm_hf.evaluation.vqa import normalize_answer, read_vqa_examples, score_answers, vqa_accuracy
from dreamllm_hf.shapes_world.world import COLOURS, SHAPES, draw_shape, sample_spec


pytestmark = pytest.mark.usefixtures("one_thread")


# A shorter training than the command's 300 steps: colours are learnt first, which the checks below need.
TEST_CLIP_STEPS = 120


@functools.cache
def shapes_benchmark() -> Path:
    """`evaluate shapes-data` output (small), built once per test process and shared by the evaluation tests."""
    from dreamllm_hf.evaluation.shapes import write_shapes_benchmark

    folder = Path(tempfile.mkdtemp(prefix="shapes-benchmark-"))
    atexit.register(shutil.rmtree, folder, True)
    write_shapes_benchmark(folder, num_captions=12, num_reference=60, num_pictures=6, clip_steps=TEST_CLIP_STEPS)
    return folder


def shapes(count: int, seed: int, paint: dict | None = None) -> list[PIL.Image.Image]:
    """Pictures of the world; with `paint`, each shape's colour is replaced by the RGB it maps that colour to."""
    rng = random.Random(seed)
    pictures = []
    for _ in range(count):
        spec = sample_spec(rng)
        picture = draw_shape(spec)
        if paint:
            pixels = np.asarray(picture).copy()
            pixels[(pixels == COLOURS[spec.colour]).all(axis=-1)] = paint[spec.colour]
            picture = PIL.Image.fromarray(pixels)
        pictures.append(picture)
    return pictures


def noise(count: int, seed: int) -> list[PIL.Image.Image]:
    generator = np.random.default_rng(seed)
    return [PIL.Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


WRONG_COLOURS = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
# Colours the world never uses (purple, orange, cyan, pink): the same shapes, another distribution of pictures.
OFF_WORLD_PAINT = {"red": (128, 0, 128), "green": (255, 140, 0), "blue": (0, 200, 200), "yellow": (255, 105, 180)}


def fids(network, reference, *generated_sets) -> list[float]:
    """FID of each set against `reference` (one scorer: the reference's features are computed once)."""
    scorer = FIDScorer(network, resolution=32, batch_size=40)
    scorer.add_reference(reference)
    values = []
    for generated in generated_sets:
        scorer.reset_generated()
        scorer.add_generated(generated)
        values.append(scorer.compute())
    return values


# --------------------------------------------------------------------------------------------------------------------
# FID


class TinyInception(torch.nn.Module):
    """A stand-in for the TorchScript FID Inception: same call (`uint8` pictures, `return_features=True`)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, kernel_size=3)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path


@pytest.fixture(scope="module")
def clip_features():
    return TransformersImageFeatures(shapes_benchmark() / "clip")


@pytest.mark.parametrize("network_kind", ["inception", "clip"])
def test_fid_of_the_same_world_is_far_below_wrong_colours_and_noise(network_kind, inception_file, clip_features):
    network = InceptionFeatures(inception_file) if network_kind == "inception" else clip_features
    reference = shapes(80, seed=1)
    same_world, wrong_colours, pure_noise, itself = fids(
        network, reference, shapes(80, seed=2), shapes(80, seed=2, paint=OFF_WORLD_PAINT), noise(80, seed=3), reference
    )
    print(
        f"{network_kind}: same world {same_world:.3f}, off-world colours {wrong_colours:.3f}, noise {pure_noise:.3f}"
    )
    assert 0 <= same_world < wrong_colours / 4, (same_world, wrong_colours)
    assert same_world < pure_noise / 4, (same_world, pure_noise)
    assert abs(itself) < 1e-3 * wrong_colours  # a set against itself


def test_reference_statistics_match_numpy_and_round_trip_through_npz(tmp_path, clip_features):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = shapes(50, seed=4)
    for index, picture in enumerate(reference):
        picture.save(reference_dir / f"{index:03d}.png")
    generated = shapes(40, seed=5, paint=OFF_WORLD_PAINT)

    from_folder = FIDScorer(clip_features, resolution=32)
    load_reference(from_folder, reference_dir)
    mu, sigma, count = from_folder.statistics(real=True)
    features = clip_features(pictures_to_uint8(reference)).double().numpy()
    assert count == 50
    np.testing.assert_allclose(mu, features.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), atol=1e-5)  # pytorch-fid's sigma

    save_statistics(tmp_path / "stats.npz", mu, sigma, feature_network="clip", resolution=32, count=count)
    read_mu, read_sigma = load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(read_mu, mu)
    np.testing.assert_array_equal(read_sigma, sigma)
    from_stats = FIDScorer(clip_features, resolution=32)
    load_reference(from_stats, tmp_path / "stats.npz")
    from_folder.add_generated(generated)
    from_stats.add_generated(generated)
    assert from_stats.compute() == pytest.approx(from_folder.compute(), rel=1e-6)


def test_fid_refuses_statistics_of_another_feature_network(tmp_path, clip_features):
    save_statistics(tmp_path / "inception.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit, match="2048 features but the feature network gives 32"):
        load_reference(FIDScorer(clip_features, resolution=32), tmp_path / "inception.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(SystemExit, match="need 'mu' and 'sigma'"):
        load_statistics(tmp_path / "other.npz")


def test_inception_weights_must_be_a_torchscript_file(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pth")
    with pytest.raises(SystemExit, match="not a TorchScript file"):
        InceptionFeatures(tmp_path / "state_dict.pth")


# --------------------------------------------------------------------------------------------------------------------
# CLIP score and selection


@pytest.fixture(scope="module")
def clip_scorer():
    return CLIPScorer(shapes_benchmark() / "clip")


def test_clip_selection_picks_the_planted_picture(clip_scorer):
    rng = random.Random(7)
    for colour in COLOURS:
        shape = rng.choice(SHAPES)
        wrong = [draw_shape(sample_spec(rng, colour=WRONG_COLOURS[colour], shape=shape)) for _ in range(3)]
        right = draw_shape(sample_spec(rng, colour=colour, shape=shape))
        planted = rng.randrange(4)
        pictures = wrong[:planted] + [right] + wrong[planted:]
        scores = clip_scorer.scores(pictures, [f"a {colour} {shape}"] * 4)
        assert select_best(scores) == planted, (colour, shape, scores)


def test_clip_score_is_torchmetrics_mean_of_the_pair_scores(clip_scorer):
    rng = random.Random(8)
    specs = [sample_spec(rng) for _ in range(10)]
    pictures = [draw_shape(spec) for spec in specs]
    captions = [f"a {spec.name}" for spec in specs]
    scores = clip_scorer.scores(pictures, captions)
    assert clip_scorer.mean_score(pictures, captions) == pytest.approx(float(scores.mean()), rel=1e-5)
    mismatched = clip_scorer.mean_score(pictures, captions[1:] + captions[:1])
    assert mismatched < float(scores.mean())  # pictures score higher with their own captions


# --------------------------------------------------------------------------------------------------------------------
# VQA


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Yes.", "yes"),
        ("  Red\n", "red"),
        ("Two", "2"),
        ("none", "0"),
        ("the dog", "dog"),
        ("an apple!", "apple"),
        ("dont know", "don't know"),
        ("isnt it", "isn't it"),
        ("well", "well"),
        ("100,978", "100978"),
        ("3.5", "3.5"),
        ("t-shirt", "t shirt"),
        ("2:50 pm", "2:50 pm"),
        ("girl's", "girl's"),
        ("A, B", "b"),
        ("U.S.", "us"),
        ("red/white", "red white"),
    ],
)
def test_vqa_normalisation_of_the_standard_examples(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.parametrize("matching, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matching, accuracy):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("Two.", answers) == pytest.approx(accuracy)


def test_vqa_scores_only_questions_with_answers():
    from dreamllm_hf.evaluation.data import ImageExample

    examples = [ImageExample(0, Path("a.png"), "q", ["yes"] * 10), ImageExample(1, Path("b.png"), "q", [])]
    assert score_answers(examples, ["Yes", "no"]) == {"accuracy": 100.0, "scored": 1, "unanswered_by_annotators": 1}


def _picture(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(sample_spec(random.Random(0))).save(path)
    return path


def test_vqa_formats_are_read_with_their_ids(tmp_path):
    images = tmp_path / "images"
    _picture(images / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What?", "question_id": 420}]}
    annotations = {"annotations": [{"question_id": 420, "image_id": 42, "answers": [{"answer": "cat"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    examples, name, key = read_vqa_examples(tmp_path / "q.json", images, tmp_path / "a.json")
    assert (name, key, examples[0].question, examples[0].references) == ("vqav2", "question_id", "What?", ["cat"] * 10)
    assert examples[0].ids == {"question_id": 420, "image_id": 42}

    _picture(images / "abc.jpg")
    textvqa = {"data": [{"question_id": 7, "image_id": "abc", "question": "Brand?", "answers": ["nike"] * 10}]}
    (tmp_path / "textvqa.json").write_text(json.dumps(textvqa))
    examples, name, key = read_vqa_examples(tmp_path / "textvqa.json", images)
    assert (name, key, examples[0].references[0]) == ("textvqa", "question_id", "nike")

    _picture(images / "VizWiz_val_00000001.jpg")
    vizwiz = [
        {
            "image": "VizWiz_val_00000001.jpg",
            "question": "What is it?",
            "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10,
        }
    ]
    (tmp_path / "vizwiz.json").write_text(json.dumps(vizwiz))
    examples, name, key = read_vqa_examples(tmp_path / "vizwiz.json", images)
    assert (name, key, examples[0].ids, examples[0].references[0]) == (
        "vizwiz",
        "image",
        {"image": "VizWiz_val_00000001.jpg"},
        "soup",
    )

    missing = {"data_subtype": "val2014", "questions": [{"image_id": 5, "question": "What?", "question_id": 50}]}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(SystemExit, match=r"questions\[0\].*not found: COCO_val2014_000000000005.jpg"):
        read_vqa_examples(tmp_path / "missing.json", images)


def test_vqa_json_lines_errors_name_the_line(tmp_path):
    _picture(tmp_path / "p.png")
    good = {"image": "p.png", "question": "What colour?", "answers": ["red"]}
    (tmp_path / "q.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({"image": "p.png"}) + "\n")
    with pytest.raises(SystemExit, match="line 3"):
        read_vqa_examples(tmp_path / "q.jsonl")


# --------------------------------------------------------------------------------------------------------------------
# Caption scores


def test_caption_scores_prefer_the_right_captions():
    from dreamllm_hf.evaluation.captions import score_captions

    references = {
        0: ["a red circle", "the red circle"],
        1: ["a blue square", "one blue square"],
        2: ["a green triangle", "a triangle that is green"],
    }
    right = score_captions(
        references, {0: "a red circle", 1: "a blue square", 2: "a green triangle"}, ["BLEU-4", "ROUGE-L", "CIDEr"]
    )
    wrong = score_captions(
        references, {0: "a blue square", 1: "a green triangle", 2: "a red circle"}, ["BLEU-4", "ROUGE-L", "CIDEr"]
    )
    assert right["count"] == 3 and set(right["scores"]) == {"BLEU-4", "ROUGE-L", "CIDEr"}
    for name in ("ROUGE-L", "CIDEr"):
        assert right["scores"][name] > 2 * wrong["scores"][name], name
    assert right["scores"]["ROUGE-L"] == pytest.approx(100.0)
    assert len(right["per_caption"]["CIDEr"]) == 3


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def test_captions_from_coco_json_lines_and_a_sample(tmp_path):
    coco = {"annotations": [{"image_id": 9, "id": 90 + i, "caption": f"caption {i} "} for i in range(5)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    records = read_captions(tmp_path / "captions_val2014.json")
    assert [r.caption for r in records] == [f"caption {i}" for i in range(5)]
    assert records[2].ids == {"image_id": 9, "id": 92} and records[2].id == "c000002"
    sample = read_captions(tmp_path / "captions_val2014.json", limit=3, sample_seed=1)
    assert sample == read_captions(tmp_path / "captions_val2014.json", limit=3, sample_seed=1)
    texts = [r.caption for r in sample]
    assert len(set(texts)) == 3 and texts == sorted(texts)  # a sample, in input order

    (tmp_path / "captions.jsonl").write_text('{"caption": "a red circle", "key": 1}\n{"text": "no caption"}\n')
    with pytest.raises(SystemExit, match='line 2: no "caption"'):
        read_captions(tmp_path / "captions.jsonl")


def test_seeds_and_picture_seeds():
    assert parse_seeds("42-49") == list(range(42, 50))
    assert parse_seeds("0,3,7") == [0, 3, 7] and parse_seeds("5") == [5]
    for bad in ("49-42", "a", "1,1", "-3"):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)
    # torch's CPU generator reads 32 bits of a seed: every (seed, caption) must still get its own noise.
    streams = {picture_seed(seed, index) for seed in range(42, 50) for index in range(30_000)}
    assert len(streams) == 8 * 30_000 and max(streams) < 2**32
    first = torch.randn(4, generator=torch.Generator().manual_seed(picture_seed(42, 0)))
    second = torch.randn(4, generator=torch.Generator().manual_seed(picture_seed(43, 0)))
    assert not torch.equal(first, second)


def test_captions_from_a_dataset_and_pictures_from_a_coco_caption_file(tmp_path):
    import datasets

    from dreamllm_hf.evaluation.data import read_captioning_examples

    datasets.Dataset.from_dict({"caption": ["a red circle", "a blue square"], "image_id": [3, 4]}).save_to_disk(
        str(tmp_path / "captions")
    )
    records = read_captions(tmp_path / "captions")
    assert [(r.caption, r.ids) for r in records] == [
        ("a red circle", {"image_id": 3}),
        ("a blue square", {"image_id": 4}),
    ]

    _picture(tmp_path / "val2014" / "COCO_val2014_000000000003.jpg")
    coco = {
        "images": [{"id": 3, "file_name": "COCO_val2014_000000000003.jpg"}],
        "annotations": [
            {"image_id": 3, "id": 1, "caption": "a red circle"},
            {"image_id": 3, "id": 2, "caption": "red"},
        ],
    }
    (tmp_path / "karpathy_test.json").write_text(json.dumps(coco))
    examples = read_captioning_examples(tmp_path / "karpathy_test.json", tmp_path / "val2014")
    assert examples[0].references == ["a red circle", "red"] and examples[0].ids == {"image_id": 3}
    with pytest.raises(SystemExit, match="give --images DIR"):
        read_captioning_examples(tmp_path / "karpathy_test.json")
