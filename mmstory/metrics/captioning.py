"""Caption metrics exactly as the COCO caption evaluation (pycocoevalcap) computes them.

Scores come from pycocoevalcap's own scorers (BLEU-1..4 with the 'closest'
reference length, ROUGE-L with beta=1.2, CIDEr = CIDEr-D with sigma=6 and
clipping, METEOR 1.5 via Java). Only the tokenisation has a fallback:

* ``tokenize="ptb"`` (default): Stanford PTBTokenizer via Java when ``java`` is
  on PATH (what COCOEvalCap does), otherwise the pure-Python reproduction in
  :mod:`mmstory.metrics.ptb_tokenize` (tested equal on real-looking captions).
* ``tokenize="chars"``: for Chinese (AIC-ICC, Flickr8k-CN, ...), split every CJK
  character into its own token, as Chinese captioning papers commonly do —
  PTB does not segment Chinese, so a whole sentence would be one "word".
* ``tokenize="none"``: captions are already tokenised; only split on spaces.

Without Java, METEOR is reported as ``None`` with a warning (it has no
faithful pure-Python equivalent: it needs the Meteor 1.5 paraphrase tables).
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from typing import Hashable, Iterator, Mapping, Sequence

from .ptb_tokenize import char_tokenize, tokenize_batch

Key = Hashable


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (PTBTokenizer / METEOR need it)."""
    return shutil.which("java") is not None


def _check_inputs(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]]) -> None:
    missing = [k for k in predictions if k not in references]
    if missing:
        raise KeyError(f"predictions without references for keys {missing[:5]}")
    extra = [k for k in references if k not in predictions]
    if extra:
        raise KeyError(f"references without a prediction for keys {extra[:5]}")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise TypeError(f"prediction for key {k!r} must be a str, got {type(p).__name__}")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings, got {refs!r}")


def java_ptb_tokenize(captions: Mapping[Key, Sequence[str]]) -> dict[Key, list[str]]:
    """Tokenise with pycocoevalcap's PTBTokenizer (Java), in its input format."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def tokenize_captions(captions: Mapping[Key, Sequence[str]], tokenize: str = "ptb",
                      use_java: bool | None = None) -> dict[Key, list[str]]:
    """Tokenise ``{key: [caption, ...]}`` into ``{key: [tokenised caption, ...]}``.

    ``use_java=None`` means "Java if available" for ``tokenize="ptb"``.
    """
    if tokenize == "ptb":
        if use_java is None:
            use_java = java_available()
        if use_java:
            return java_ptb_tokenize(captions)
        # Same flat order as pycocoevalcap (cross-caption context matters, see ptb_tokenize).
        flat = tokenize_batch([c for v in captions.values() for c in v])
        out, i = {}, 0
        for k, v in captions.items():
            out[k] = flat[i:i + len(v)]
            i += len(v)
        return out
    if tokenize == "chars":
        return {k: [char_tokenize(c) for c in v] for k, v in captions.items()}
    if tokenize == "none":
        return {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}
    raise ValueError(f"tokenize must be 'ptb', 'chars' or 'none', got {tokenize!r}")


@contextlib.contextmanager
def meteor_scorer() -> Iterator[object]:
    """pycocoevalcap's Meteor, with its Java subprocess closed on exit.

    Meteor only closes its process in ``__del__``; we close it deterministically
    so tests and long runs do not leak JVMs.
    """
    from pycocoevalcap.meteor.meteor import Meteor
    m = Meteor()
    try:
        yield m
    finally:
        p = m.meteor_p
        with m.lock:
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            if p.poll() is None:
                p.kill()
            p.wait()
        # Meteor.__del__ later re-closes/kills: harmless on an exited process.


def score_tokenized(gts: Mapping[Key, list[str]], res: Mapping[Key, list[str]],
                    meteor: bool = True) -> dict[str, float | None]:
    """Run the COCO scorers on tokenised ``gts``/``res`` (each value a list of strings).

    Returns corpus-level ``Bleu_1..4, METEOR, ROUGE_L, CIDEr`` (METEOR None if skipped).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i, b in enumerate(bleu):
        out[f"Bleu_{i + 1}"] = float(b)
    if meteor:
        with meteor_scorer() as m:
            out["METEOR"] = float(m.compute_score(gts, res)[0])
    else:
        out["METEOR"] = None
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def caption_scores(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]],
                   tokenize: str = "ptb", use_java: bool | None = None,
                   meteor: bool | None = None) -> dict[str, float | None]:
    """COCO caption metrics for one prediction per key against its references.

    Args:
        predictions: ``{key: caption}`` (N keys).
        references: ``{key: [ref caption, ...]}`` with the same N keys.
        tokenize: ``"ptb"`` (COCO), ``"chars"`` (Chinese: one token per CJK char) or ``"none"``.
        use_java: force (True) / forbid (False) the Java PTBTokenizer; None = if available.
        meteor: compute METEOR (needs Java); None = if Java is available.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}``; METEOR is None when skipped.
        Note CIDEr here is CIDEr-D, as in the COCO evaluation (and it depends on the
        document frequencies of the whole reference set passed in).
    """
    _check_inputs(predictions, references)
    if not predictions:
        raise ValueError("caption_scores got no predictions")
    keys = list(predictions)
    res = tokenize_captions({k: [predictions[k]] for k in keys}, tokenize, use_java)
    gts = tokenize_captions({k: list(references[k]) for k in keys}, tokenize, use_java)
    if meteor is None:
        meteor = java_available()
        if not meteor:
            warnings.warn("java not found on PATH: METEOR needs Java (Meteor 1.5) and is "
                          "reported as None; BLEU/ROUGE-L/CIDEr use the pure-Python PTB tokeniser.",
                          RuntimeWarning, stacklevel=2)
    elif meteor and not java_available():
        raise RuntimeError("meteor=True but java is not on PATH")
    return score_tokenized(gts, res, meteor=meteor)
