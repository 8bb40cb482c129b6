"""Corpus-level translation scores (sacrebleu) per language and overall."""
from __future__ import annotations

import sacrebleu
from sacrebleu.significance import PairedTest


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


SIGNIFICANCE_METRICS = ("bleu", "chrf++", "ter")


def paired_bootstrap(baseline_hyps: list[str], system_hyps: list[str], refs: list[str], n_samples: int = 1000) -> dict:
    """Paired bootstrap resampling (Koehn 2004, as sacrebleu's ``--paired-bs``) of one system
    against a baseline on the same references: per metric, both scores, the difference, the
    p-value of "no difference" and the system's 95% confidence half-width. The resampling seed is
    sacrebleu's (``SACREBLEU_SEED``, default 12345) and appears in the signature."""
    if not (len(baseline_hyps) == len(system_hyps) == len(refs)):
        raise ValueError(f"paired test needs aligned lists: {len(baseline_hyps)} baseline hypotheses, "
                         f"{len(system_hyps)} system hypotheses, {len(refs)} references")
    metrics = {"bleu": sacrebleu.metrics.BLEU(), "chrf++": sacrebleu.metrics.CHRF(word_order=2),
               "ter": sacrebleu.metrics.TER()}
    test = PairedTest([("baseline", baseline_hyps), ("system", system_hyps)], metrics, [refs],
                      test_type="bs", n_samples=n_samples)
    signatures, results = test()
    # PairedTest keys its result columns by each metric's display name (BLEU, chrF2++, TER), in
    # the order of ``metrics``; the first entry of each column is the baseline.
    display_names = [name for name in results if name != "System"]
    out = {}
    for key, display_name in zip(metrics, display_names):
        baseline, system = results[display_name]
        out[key] = {
            "baseline": baseline.score,
            "system": system.score,
            "delta": system.score - baseline.score,
            # sacrebleu's test counts resampled differences strictly above the observed one, so two
            # identical outputs get p = 1/(n+1) instead of 1: identical outputs cannot differ.
            "p_value": 1.0 if baseline_hyps == system_hyps else system.p_value,
            "system_ci95": system.ci,
            "signature": str(signatures[display_name]),
        }
    return out
