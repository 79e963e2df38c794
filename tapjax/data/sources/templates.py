"""Prompt and answer templates of the paper's text tasks.

The strings follow the reference implementation's formatting
(``TAP_final/utils/process_datasets.py``: the MMLU, VQA and CommonGen
formatters, and AG News' ``title + newline + description`` input), so a model
trained here sees the same text. Each function takes plain Python strings and
returns the templated string; the dataset table
(:mod:`tapjax.data.sources.tfds`) decides which template a dataset uses.

Lists of options are lettered ``A. ..``, ``B. ..`` one per line, as the
reference does for MMLU choices and CommonGen concepts.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
  "COMMONGEN_ANSWER_HEAD",
  "COMMONGEN_PROMPT_HEAD",
  "MMLU_PROMPT_HEAD",
  "VQA_ANSWER_HEAD",
  "VQA_PROMPT_HEAD",
  "commongen_answer",
  "commongen_prompt",
  "lettered",
  "mmlu_answer",
  "mmlu_prompt",
  "news_text",
  "vqa_answer",
  "vqa_prompt",
]

# The fixed text every prompt / answer of a template starts with.
MMLU_PROMPT_HEAD = "The following is a multiple-choice question about "
VQA_PROMPT_HEAD = "Answer the question based on the image.\n\nQuestion: "
VQA_ANSWER_HEAD = "Answer: "
COMMONGEN_PROMPT_HEAD = "Generate an appropriate description from the concepts below.\n\nConcepts:\n"
COMMONGEN_ANSWER_HEAD = "Description: "


def _letter(i: int) -> str:
  """``A`` for 0, ``B`` for 1, ...; past ``Z`` the code points go on (``[``, ``\\``...), as the reference's."""
  if i < 0:
    raise ValueError(f"option index {i} must be >= 0")
  return chr(ord("A") + i)


def lettered(options: Sequence[str]) -> str:
  """``options`` as ``"A. first\\nB. second..."`` (no trailing newline)."""
  return "\n".join(f"{_letter(i)}. {text}" for i, text in enumerate(options))


def mmlu_prompt(question: str, choices: Sequence[str], subject: str) -> str:
  """An MMLU question with its lettered choices; ``subject`` is the word the
  prompt names (``"law"``, ``"medicine"``, ``"ethics"``)."""
  return (
    f"{MMLU_PROMPT_HEAD}{subject}. Choose the correct answer from the options below.\n\n"
    f"Question: {question}\nOptions:\n{lettered(choices)}\n\n"
  )


def mmlu_answer(choices: Sequence[str], answer: int, subject: str) -> str:
  """The target of an MMLU question: ``"Correct answer on law: B. <choice B>"``."""
  if not 0 <= answer < len(choices):
    raise ValueError(f"MMLU answer index {answer} is outside the {len(choices)} choices")
  return f"Correct answer on {subject}: {_letter(answer)}. {choices[answer]}"


def vqa_prompt(question: str) -> str:
  """A VQA question (the image goes in separately)."""
  return f"{VQA_PROMPT_HEAD}{question}\n"


def vqa_answer(answer: str) -> str:
  """The target of a VQA question (its most common answer)."""
  return f"{VQA_ANSWER_HEAD}{answer}"


def commongen_prompt(concepts: Sequence[str]) -> str:
  """A CommonGen concept set, lettered one per line."""
  return f"{COMMONGEN_PROMPT_HEAD}{lettered(concepts)}\n\n"


def commongen_answer(target: str) -> str:
  """The target of a CommonGen concept set: one sentence using the concepts."""
  return f"{COMMONGEN_ANSWER_HEAD}{target}"


def news_text(title: str, description: str) -> str:
  """The input of AG News classification: title, newline, description (no template)."""
  return f"{title}\n{description}"
