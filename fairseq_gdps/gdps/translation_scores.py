"""Corpus-level translation scores (sacrebleu) per language and overall."""
from __future__ import annotations

import sacrebleu


def score_corpus(hyps: list[str], refs: list[str]) -> dict:
    """BLEU, chrF, chrF++, TER and exact-match rate of one set of hypotheses."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    chrfpp = sacrebleu.metrics.CHRF(word_order=2)
    ter = sacrebleu.metrics.TER()
    return {
        "n": len(hyps),
        "bleu": bleu.corpus_score(hyps, [refs]).score,
        "chrf": chrf.corpus_score(hyps, [refs]).score,
        "chrf++": chrfpp.corpus_score(hyps, [refs]).score,
        "ter": ter.corpus_score(hyps, [refs]).score,
        "exact_match": 100.0 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(hyps), 1),
        "signatures": {
            "bleu": str(bleu.get_signature()),
            "chrf": str(chrf.get_signature()),
            "chrf++": str(chrfpp.get_signature()),
            "ter": str(ter.get_signature()),
        },
    }
