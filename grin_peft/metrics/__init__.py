"""Unlearning metrics: TOFU's table (open-unlearning's definitions), MIA, multiple choice, keywords, harmful content.

One module per family, all re-exported here (``from grin_peft.metrics import evaluate_tofu`` keeps working):

* :mod:`.passes`: the two model passes everything is built from (:func:`score_answers`, :func:`generate_answers`).
* :mod:`.rouge`: ROUGE-L recall by the ``rouge_score`` package, stemmed as open-unlearning.
* :mod:`.tofu`: probability, truth ratio, exact memorisation, extraction strength, forget quality, model utility;
  :func:`evaluate_qa` and :func:`evaluate_tofu`.
* :mod:`.mia`: LOSS, ZLib, MinK, MinK++ membership inference, AUC and privleak.
* :mod:`.multiple_choice`: WMDP/MMLU accuracy, with lm-evaluation-harness's letter prompt.
* :mod:`.keywords`: keyword accuracy and confidence (defined here; not an open-unlearning metric).
* :mod:`.harm`: PKU-SafeRLHF-style harm evaluation with a pluggable scorer.
* :mod:`.harness`: :func:`lm_eval`, lm-evaluation-harness on the in-memory model (optional extra).

Every model-facing function takes ``tokenizer`` as a tokenizer (default :class:`~grin_peft.data.QAFormat`) or a
``QAFormat``, so scoring uses exactly the training layout.
"""

from .harm import DEFAULT_REFUSAL_MARKERS, HarmScorer, evaluate_pku, refusal_keyword_scorer
from .harness import LM_EVAL_REQUIREMENT, lm_eval, local_mcq_task
from .keywords import STOPWORDS, extract_keywords, keyword_accuracy, keyword_confidence
from .mia import (
    MIA_ATTACKS,
    evaluate_mia,
    mia_auc,
    mia_scores,
    mink_plus_plus_score,
    mink_score,
    privleak,
    roc_auc,
    zlib_score,
)
from .multiple_choice import WMDP_SUBJECTS, mcq_prompt, multiple_choice_accuracy
from .passes import AnswerScores, answer_nll, answer_probability, generate_answers, label_text, score_answers
from .rouge import rouge_l_recall, rouge_tokenize
from .tofu import (
    MODEL_UTILITY_KEYS,
    TOFU_SPLITS,
    aggregate_truth_ratio,
    evaluate_qa,
    evaluate_tofu,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    normalized_probability,
    truth_ratio,
    truth_ratios,
)

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "LM_EVAL_REQUIREMENT",
    "MIA_ATTACKS",
    "MODEL_UTILITY_KEYS",
    "STOPWORDS",
    "TOFU_SPLITS",
    "WMDP_SUBJECTS",
    "AnswerScores",
    "HarmScorer",
    "aggregate_truth_ratio",
    "answer_nll",
    "answer_probability",
    "evaluate_mia",
    "evaluate_pku",
    "evaluate_qa",
    "evaluate_tofu",
    "exact_memorization",
    "extract_keywords",
    "extraction_strength",
    "forget_quality",
    "generate_answers",
    "harmonic_mean",
    "keyword_accuracy",
    "keyword_confidence",
    "label_text",
    "lm_eval",
    "local_mcq_task",
    "mcq_prompt",
    "mia_auc",
    "mia_scores",
    "mink_plus_plus_score",
    "mink_score",
    "multiple_choice_accuracy",
    "normalized_probability",
    "privleak",
    "refusal_keyword_scorer",
    "roc_auc",
    "rouge_l_recall",
    "rouge_tokenize",
    "score_answers",
    "truth_ratio",
    "truth_ratios",
    "zlib_score",
]
