"""``compare --audit``: the counterfactual bias audit of each method's final run, on the test split.

The tests are :mod:`multitune.risks.audit`'s (Garg et al. 2019): every test row that mentions a term of an
attribute's lexicon is rewritten with each counterpart, and a classification task reports the flip rate (the
share of a row's counterfactuals whose predicted label differs, averaged over the tested rows) with its
percentile-bootstrap 95% interval; a generation task reports the change in its responses' summed
log-probability instead (:func:`~multitune.risks.audit.logprob_test`). Only the counterfactual tests run here:
the invariance tests and metrics per group stay in ``multitune audit``, which a compared task can be given
afterwards (``multitune audit OUTPUT/bank/TASK-METHOD --data FILE``).

Every method is audited on the same rows with the same seeded bootstrap, so the flip rates are comparable
across the table. An attribute whose terms no test row mentions records 0 rows tested and no rate: the report
says "no rows mention ATTRIBUTE", never 0%.
"""

from __future__ import annotations

from typing import Any

import torch

from multitune.compare.settings import CompareConfig
from multitune.data import Example
from multitune.errors import ConfigError
from multitune.risks.audit import (
    AuditSettings,
    lexicon_variants,
    lexicons_of,
    logprob_test,
    perturbation_test,
)
from multitune.risks.lexicons import LANGUAGES, check_attributes


def audit_problems(config: CompareConfig) -> list[str]:
    """What is wrong with the audit flags, for :func:`multitune.compare.run.validate` (before any training)."""
    if not config.audit:
        if config.audit_attributes is not None or config.audit_language != "en":
            return ["--audit-attributes and --audit-language set the bias audit; add --audit to run it"]
        return []
    if config.audit_language not in LANGUAGES:
        return [f"--audit-language '{config.audit_language}' has no lexicon; use {' or '.join(LANGUAGES)}"]
    if config.audit_attributes is not None and not config.audit_attributes:
        return ["--audit-attributes is empty; give names such as gender,nationality,religion,age"]
    try:
        check_attributes(list(config.audit_attributes or []))
    except ConfigError as error:
        return [f"--audit-attributes: {error}"]
    return []


def audit_key(config: CompareConfig) -> dict[str, Any]:
    """The settings an audit result was made with: a resumed compare re-audits a method whose differ."""
    return {"attributes": config.audit_attributes, "language": config.audit_language, "seed": config.seed,
            "resamples": config.bootstrap}  # fmt: skip


def audit_task(bank: Any, task: str, examples: list[Example], config: CompareConfig) -> dict[str, Any]:
    """The counterfactual tests of ``task`` on ``examples`` (the test split): what a method's result records."""
    from multitune.preference.scoring import sequence_logps
    from multitune.training.evaluate import predict_proba

    settings = AuditSettings(
        attributes=tuple(config.audit_attributes) if config.audit_attributes is not None else None,
        language=config.audit_language, resamples=config.bootstrap, seed=config.seed,
        batch_size=config.train.eval_batch_size,
    )  # fmt: skip
    lexicons = lexicons_of(settings.attributes, None, settings.language)
    length, batch = config.train.max_length, config.train.eval_batch_size
    attributes: dict[str, Any] = {}
    if config.kind == "classification":

        def proba(items: list[Example]) -> torch.Tensor:
            return predict_proba(bank, task, items, length, batch)

        probs = proba(examples)
        labels = bank.tasks[task].labels
        for lexicon in lexicons:
            variants = lexicon_variants(lexicon)
            attributes[lexicon.attribute] = perturbation_test(
                proba, examples, probs, variants, labels, settings
            )
    else:

        def score(items: list[Example]) -> torch.Tensor:
            with torch.no_grad():
                prompts, responses = [e.text for e in items], [e.response or "" for e in items]
                return (
                    sequence_logps(bank, task, prompts, responses, length, max(1, batch // 4)).float().cpu()
                )

        base = score(examples)
        for lexicon in lexicons:
            attributes[lexicon.attribute] = logprob_test(
                score, examples, base, lexicon_variants(lexicon), settings
            )
    return {
        "kind": config.kind,
        "split": "test",
        "rows": len(examples),
        "settings": audit_key(config),
        "attributes": attributes,
    }


def audit_saved(config: CompareConfig, result: dict[str, Any], examples: list[Example]) -> dict[str, Any]:
    """The audit of a method finished in an earlier run, from its saved task folder (``OUTPUT/bank/TASK``)."""
    from multitune.api import load

    device = None if config.train.device == "auto" else config.train.device
    trained = load(config.out / result["adapter"], device=device)
    return audit_task(trained.bank, trained.task, examples, config)
