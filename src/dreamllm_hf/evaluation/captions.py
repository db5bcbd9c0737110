"""Caption scores as the COCO caption evaluation computes them, through pycocoevalcap.

Captions and references are tokenized by pycocoevalcap's PTB tokenizer (Stanford CoreNLP, Java), then scored with
BLEU-4, METEOR (Java), ROUGE-L, CIDEr (pycocoevalcap's `Cider`, i.e. CIDEr-D) and SPICE (Java, and Stanford CoreNLP
3.6.0 models that pycocoevalcap downloads on first use). A metric that cannot run here is reported under
`unavailable` with the reason, instead of failing the others. Scores are × 100, as papers print them (CIDEr 115.4).
"""

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
JAVA_HELP = "install a Java runtime (e.g. `apt-get install -y default-jre-headless`; OpenJDK 17 works)"


def spice_missing_reason() -> str | None:
    """Why SPICE cannot run without a download, or None when its Stanford CoreNLP jars are in place."""
    from pycocoevalcap.spice import get_stanford_models

    jar = Path(get_stanford_models.SPICEDIR) / get_stanford_models.SPICELIB / f"{get_stanford_models.JAR}.jar"
    if jar.is_file():
        return None
    return (
        f"SPICE needs Stanford CoreNLP 3.6.0 ({jar} is missing), which pycocoevalcap downloads on first use and "
        "nothing may be downloaded at run time here; run `python -m pycocoevalcap.spice.get_stanford_models` once on "
        "a machine with network access"
    )


def _tokenize(captions: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": text} for text in texts] for key, texts in captions.items()})


def _scorer(name: str):
    if name == "BLEU-4":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    if name == "ROUGE-L":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return Cider()
    if name == "SPICE":
        from pycocoevalcap.spice.spice import Spice

        return Spice()
    raise ValueError(f"unknown caption metric {name!r}; choose from {', '.join(CAPTION_METRICS)}.")


def score_captions(
    references: Mapping[int, Sequence[str]],
    predictions: Mapping[int, str],
    metrics: Sequence[str] = CAPTION_METRICS,
) -> dict:
    """
    Scores `predictions` (one caption per key) against `references` (one or more captions per key).

    Returns `{"scores": {metric: score × 100}, "per_caption": {metric: [score × 100 per key, in key order]},
    "unavailable": {metric: reason}, "count": n}`.
    """
    unknown = [name for name in metrics if name not in CAPTION_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {', '.join(CAPTION_METRICS)}.")
    if set(references) != set(predictions):
        raise ValueError(
            f"{len(set(references) ^ set(predictions))} key(s) have a caption but no references, or the reverse."
        )
    if not predictions:
        raise ValueError("no captions to score.")
    if shutil.which("java") is None:
        raise SystemExit(f"error: caption scores need Java (pycocoevalcap's tokenizer and METEOR); {JAVA_HELP}.")
    keys = sorted(predictions)
    scores, per_caption, unavailable = {}, {}, {}
    # pycocoevalcap prints progress to stdout; the command's stdout ends with its JSON line, so send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        gts = _tokenize({key: list(references[key]) for key in keys})
        res = _tokenize({key: [predictions[key]] for key in keys})
        for name in metrics:
            if name == "SPICE" and (reason := spice_missing_reason()):
                unavailable[name] = reason
                continue
            try:
                score, per_key = _scorer(name).compute_score(gts, res)
            except (OSError, ValueError, subprocess.CalledProcessError) as error:
                unavailable[name] = f"{name} failed to run: {error}"
                continue
            if name == "BLEU-4":  # Bleu(4) gives BLEU-1..4
                score, per_key = score[3], per_key[3]
            scores[name] = 100 * float(score)
            per_caption[name] = [100 * float(value) for value in _per_key_values(per_key)]
    return {"scores": scores, "per_caption": per_caption, "unavailable": unavailable, "count": len(keys)}


def _per_key_values(per_key) -> list[float]:
    values = []
    for value in per_key:
        if isinstance(value, dict):  # SPICE: {"All": {"f": ...}, ...}
            value = value["All"]["f"]
        values.append(float(value))
    return values


__all__ = ["CAPTION_METRICS", "score_captions", "spice_missing_reason"]
