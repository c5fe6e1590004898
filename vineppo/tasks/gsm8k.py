"""GSM8K: grade-school word problems with numeric answers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vineppo.tasks.base import Example, Grade, Task
from vineppo.tasks.grading import extract_gsm8k_answer, gold_number, grade_gsm8k
from vineppo.tasks.steps import split_newline_steps

HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def clean_rationale(answer: str) -> str:
    """The paper's SFT target: the reference rationale without `<<...>>` calculator notes,
    ending with the line `#### N`."""
    return _CALCULATOR_NOTE.sub("", answer).strip()


def example_from_record(record: dict, index: int, split: str) -> Example:
    """An Example from a GSM8K row (`question`, `answer` ending in `#### N`); ValueError when
    the row is malformed."""
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question' must be a non-empty string")
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError("field 'answer' must be a string containing '#### <answer>'")
    final = answer.rsplit("####", 1)[1].strip()
    if not final:
        raise ValueError("field 'answer' has nothing after '####'")
    if gold_number(final) is None:
        raise ValueError(f"field 'answer' must end with '#### <number>'; got '#### {final[:40]}'")
    return Example(
        id=str(record.get("id") or f"gsm8k/{split}/{index}"),
        question=question.strip(),
        answer=final,
        solution=clean_rationale(answer),
    )


@dataclass
class GSM8KTask(Task):
    """GSM8K with newline steps (the `#### N` line merged into the last step) and numeric
    grading of the number after the last `####` (`fallback_last_number`: the last number of a
    response that has no `####`)."""

    fallback_last_number: bool = False

    def _grade(self, response: str, example: Example) -> Grade:
        return Grade(grade_gsm8k(response, example.answer, self.fallback_last_number))

    def _split(self, response: str) -> list[str]:
        return split_newline_steps(response)

    def final_answer(self, response: str) -> str | None:
        value = extract_gsm8k_answer(response, self.fallback_last_number)
        return None if value is None else str(value)


GSM8K_CHAT_INSTRUCTION = (
    "Solve the problem step by step. Write the final answer on the last line as '#### <number>'."
)
