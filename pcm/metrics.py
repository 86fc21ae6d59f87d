"""Caption metrics exactly as the COCO caption evaluation computes them (pycocoevalcap).

The pipeline is COCOEvalCap's: Stanford PTB tokenisation (lower-cased, punctuation removed),
then BLEU-1..4 (corpus, "closest" reference length), METEOR 1.5, ROUGE-L, CIDEr-D (pycocoevalcap's
`Cider`, sigma 6, clipped) and SPICE. The scorers are called directly instead of through
COCOEvalCap so that SPICE's jars are checked before it runs (it would otherwise try to
download them) and so that SPICE's per-image scores are matched by image id (COCOEvalCap
pairs SPICE's sorted ids with the unsorted ones). Values are fractions (0..1), as in COCOEvalCap;
papers print them x100.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

CORPUS_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
PER_IMAGE_KEYS = ("bleu4", "meteor", "rouge_l", "cider", "spice")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
JAVA_HINT = "install a Java runtime, e.g. `apt-get install openjdk-17-jre-headless`"

SpiceMode = Literal["auto", "on", "off"]


def spice_lib_dir() -> Path:
    """Where pycocoevalcap's SPICE looks for Stanford CoreNLP 3.6.0."""
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"


def spice_missing() -> str | None:
    """None when SPICE can run, else why not and how to fix it (checked without any network)."""
    lib = spice_lib_dir()
    missing = [name for name in SPICE_JARS if not (lib / name).is_file()]
    if not missing:
        return None
    # The folder by its place in the package, not this machine's path: the message lands in metrics.json and
    # report.md, which are shown on the dashboard and may be shared.
    return (f"Stanford CoreNLP 3.6.0 jars missing from pycocoevalcap/{lib.parent.name}/{lib.name} in the Python "
            f"environment (`pip show pycocoevalcap` prints its Location) ({', '.join(missing)}); SPICE would try to "
            f"download them. Copy both jars from {CORENLP_URL} (folder stanford-corenlp-full-2015-12-09/) into "
            f"that directory, or run `python -m pycocoevalcap.spice.get_stanford_models` on a machine with internet")


def require_java() -> str:
    """The java executable; METEOR, the PTB tokenizer and SPICE all run on Java."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(f"java not found on PATH: the COCO caption metrics run on Java; {JAVA_HINT}")
    return java


def _check_inputs(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    no_refs = [k for k in predictions if k not in references]
    if no_refs:
        raise ValueError(f"{len(no_refs)} predicted images have no references, e.g. {no_refs[:5]}; "
                         "evaluate with the captions stage of the same dataset as the image features")
    no_pred = [k for k in references if k not in predictions]
    if no_pred:
        raise ValueError(f"{len(no_pred)} reference images have no prediction, e.g. {no_pred[:5]}")
    empty = [k for k, refs in references.items() if not [r for r in refs if r and r.strip()]]
    if empty:
        raise ValueError(f"{len(empty)} images have no non-empty reference caption, e.g. {empty[:5]}")
    bad = [k for k, v in predictions.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"predictions must be strings; not for images {bad[:5]}")


def _score_spice(gts: dict, res: dict, mode: SpiceMode) -> tuple[float | str, dict[str, float] | None]:
    """(corpus SPICE or the reason it is absent, per-image SPICE F-score by image id or None)."""
    if mode == "off":
        return "skipped: spice=off", None
    why = spice_missing()
    if why:
        if mode == "on":
            raise RuntimeError(f"spice=on but SPICE cannot run: {why}")
        log.warning("SPICE unavailable: %s", why)
        return f"unavailable: {why}", None
    from pycocoevalcap.spice.spice import Spice

    try:
        score, scores = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        if mode == "on":
            raise RuntimeError(f"SPICE failed: {e}") from e
        log.warning("SPICE failed: %s", e)
        return f"unavailable: SPICE failed ({e}); it needs ~8 GB of Java heap and Java 8+", None
    # Spice returns its per-image scores in sorted image-id order.
    per_image = {k: float(s["All"]["f"]) for k, s in zip(sorted(gts), scores, strict=True)}
    return float(score), per_image


def _tokenize(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict]:
    """PTB-tokenised references and predictions, as every COCO scorer expects them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k] if r and r.strip()] for k in predictions})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in predictions})
    return gts, res


def score_cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Corpus CIDEr-D alone (the same tokenizer and scorer as `score_captions`): for validation.

    One JVM start (the tokenizer) instead of three, and no METEOR: validation during training
    needs only the score it selects on.
    """
    _check_inputs(predictions, references)
    require_java()
    from pycocoevalcap.cider.cider import Cider

    gts, res = _tokenize(predictions, references)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


@contextlib.contextmanager
def meteor_process() -> Iterator[Any]:
    """A METEOR Java process of its own for `score_captions(..., meteor=...)` calls, stopped on leaving the block.

    Its first score loads METEOR's paraphrase tables (about 10 s on two cores); later scores take
    milliseconds, and equal those of a fresh process (each EVAL aggregates only its own segments).
    """
    require_java()
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        _stop(scorer)


_SHARED: dict[int, Any] = {}   # pid -> this process's kept METEOR scorer (a forked child starts its own)


def shared_meteor() -> Any:
    """This process's METEOR Java process: started on first use, kept for later scores, stopped at exit.

    Every start loads METEOR's paraphrase tables again (10-15 CPU-seconds on two cores), so a process
    that scores several times (the scores and the control of an evaluation, several evaluations in one
    `pcm run`, a notebook) starts it once. A forked child never writes to its parent's process, and
    one that has died is replaced.
    """
    scorer = _SHARED.get(os.getpid())
    if scorer is None or scorer.meteor_p.poll() is not None:
        require_java()
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = _SHARED[os.getpid()] = Meteor()
        atexit.register(_stop_at_exit, os.getpid(), scorer)
    return scorer


def _stop_at_exit(owner: int, scorer: Any) -> None:
    """The exit handler of `owner`'s METEOR: a forked child inherits it and must not kill its parent's process."""
    if os.getpid() == owner:
        _stop(scorer)


def _stop(scorer: Any) -> None:
    """Stop a METEOR Java process now, not at garbage collection (Meteor.__del__ then finds it stopped)."""
    with scorer.lock:
        if scorer.meteor_p.poll() is None:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def score_captions(predictions: dict[str, str], references: dict[str, list[str]],
                   spice: SpiceMode = "auto", *, meteor: Any = None,
                   ) -> tuple[dict[str, float | str], dict[str, dict[str, float]]]:
    """Corpus metrics (COCOEvalCap names: Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE) and per-image scores.

    `predictions` maps image id -> caption, `references` image id -> reference captions (raw text;
    both are PTB-tokenised here). `spice`: "auto" computes SPICE when its jars are present and
    otherwise reports `"unavailable: <why>"`; "on" requires it; "off" reports `"skipped: ..."`.
    Per-image scores (`bleu4`, `meteor`, `rouge_l`, `cider`, and `spice` when computed) are keyed
    by image id. `meteor`: the METEOR scorer to use (a `meteor_process()`); by default `shared_meteor()`.
    """
    if spice not in ("auto", "on", "off"):
        raise ValueError(f"spice must be auto, on or off; got {spice!r}")
    _check_inputs(predictions, references)
    require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(predictions)
    gts, res = _tokenize(predictions, references)

    corpus: dict[str, float | str] = {}
    per_image: dict[str, dict[str, float]] = {k: {} for k in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its length ratios
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"] = float(bleu[n])
    meteor_corpus, meteor_each = (meteor if meteor is not None else shared_meteor()).compute_score(gts, res)
    corpus["METEOR"] = float(meteor_corpus)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    corpus["ROUGE_L"] = float(rouge)
    cider, cider_each = Cider().compute_score(gts, res)
    corpus["CIDEr"] = float(cider)
    corpus["SPICE"], spice_each = _score_spice(gts, res, spice)

    # Every scorer but SPICE returns its per-image list in the order of gts' keys (= ids).
    for i, k in enumerate(ids):
        per_image[k]["bleu4"] = float(bleu_each[3][i])
        per_image[k]["meteor"] = float(meteor_each[i])
        per_image[k]["rouge_l"] = float(rouge_each[i])
        per_image[k]["cider"] = float(cider_each[i])
        if spice_each is not None:
            per_image[k]["spice"] = spice_each[k]
    return corpus, per_image
