"""COCO caption metrics through pycocoevalcap: PTB tokenisation, then BLEU-1..4, METEOR, ROUGE-L, CIDEr.

This is the COCO caption protocol without SPICE (it downloads Stanford CoreNLP at run time). The PTB
tokenizer and METEOR run on Java. Several systems (the model and its baselines) are scored against the
same references with one tokenizer call; the METEOR process (slow to start: it loads a paraphrase table)
is started once per Python process and reused.
"""
from __future__ import annotations

import functools
import shutil
from typing import Hashable

from ..errors import PhivlmError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def caption_metrics(refs: dict[Hashable, list[str]], systems: dict[str, dict[Hashable, str]]
                    ) -> dict[str, dict[str, float]]:
    """Corpus scores of each system's captions (one per image) against the references of that image."""
    if shutil.which("java") is None:
        raise PhivlmError("caption metrics need Java (the PTB tokenizer and METEOR of pycocoevalcap); install a JRE")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(refs)
    for name, preds in systems.items():
        if set(preds) != set(keys):
            raise PhivlmError(f"caption metrics: system {name!r} does not caption exactly the reference images")
    # one tokenizer call for references and every system: keys (system, image), one caption per system key
    batch = {("", k): [{"caption": c} for c in refs[k]] for k in keys}
    batch.update({(s, k): [{"caption": preds[k]}] for s, preds in systems.items() for k in keys})
    tokens = PTBTokenizer().tokenize(batch)
    gts = {k: tokens[("", k)] for k in keys}
    out = {}
    for s in systems:
        res = {k: tokens[(s, k)] for k in keys}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = dict(zip(METRICS[:4], bleu))
        scores["METEOR"] = _meteor().compute_score(gts, res)[0]
        scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
        scores["CIDEr"] = Cider().compute_score(gts, res)[0]
        out[s] = {m: float(scores[m]) for m in METRICS}
    return out


def prepare() -> None:
    """Start METEOR's Java process now, so that its seconds of loading overlap other work."""
    if shutil.which("java") is not None:
        _meteor()


@functools.cache
def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()
