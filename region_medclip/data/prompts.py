"""Zero-shot prompts every dataset shares: report-language templates and the normal study.

A dataset's own prompt sets (written in its report language) live in its registry entry
(``data/registry.py``); these are the fallback of every class without such phrases.
"""

# Prompt templates in the language of radiology reports: the prompt set of every dataset.
POSITIVE_TEMPLATES = ("{}", "There is {}.", "FINDINGS: There is {}.", "IMPRESSION: {}.")
NEGATIVE_TEMPLATES = ("No {}.", "There is no {}.", "FINDINGS: No {}.", "IMPRESSION: No {}.")
# How a normal study is reported: the reference of every finding with ``negatives="normal"``.
NORMAL_PROMPTS = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Lungs are clear bilaterally. IMPRESSION: Normal chest radiograph.",
)


def template_prompts(names: list[str], templates=POSITIVE_TEMPLATES) -> list[list[str]]:
    """``[C][T]``: every template filled with each class name."""
    return [[t.format(name) for t in templates] for name in names]
