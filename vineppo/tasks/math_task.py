"""MATH (Hendrycks et al.): competition problems with LaTeX answers, graded with math-verify."""

from __future__ import annotations

from dataclasses import dataclass

from vineppo.tasks.base import Example, Grade, Task
from vineppo.tasks.config import SPLITTERS
from vineppo.tasks.math_grader import DEFAULT_TIME_LIMIT, extract_math_answer, judge_math, last_boxed, readable_gold
from vineppo.tasks.paper_steps import split_paper_math_steps
from vineppo.tasks.steps import split_math_steps

_SPLIT = dict(zip(SPLITTERS, (split_math_steps, split_paper_math_steps)))

# Hub defaults: MATH-500 for test (the PRM800K test split); the original 7.5k MATH train split
# (disjoint from MATH-500, which was drawn from the original test split).
HUB_TEST = ("HuggingFaceH4/MATH-500", None, "test")
HUB_TRAIN = ("DigitalLearningGmbH/MATH-lighteval", "default", "train")
MATH_CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def example_from_record(record: dict, index: int, split: str) -> Example:
    """An Example from a MATH row: `problem`, `solution` (with `\\boxed{}`), and optionally
    `answer` (else the last boxed expression of the solution), `unique_id`, `subject`/`type`,
    `level`. ValueError when the row is malformed."""
    problem, solution = record.get("problem"), record.get("solution")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("field 'problem' must be a non-empty string")
    if not isinstance(solution, str) or not solution.strip():
        raise ValueError("field 'solution' must be a non-empty string")
    answer = record.get("answer")
    if answer is None:
        answer = last_boxed(solution)
        if answer is None:
            raise ValueError("no field 'answer' and no \\boxed{} answer in 'solution'")
    if not isinstance(answer, str):
        raise ValueError("field 'answer' must be a string")
    unreadable = readable_gold(answer)
    if unreadable:
        raise ValueError(f"field 'answer': {unreadable}")
    if last_boxed(solution) is None:
        raise ValueError("field 'solution' has no \\boxed{} final answer")
    meta = {}
    subject = record.get("subject", record.get("type"))
    if subject is not None:
        meta["subject"] = subject
    if record.get("level") is not None:
        meta["level"] = record["level"]
    return Example(
        id=str(record.get("unique_id") or f"math/{split}/{index}"),
        question=problem.strip(),
        answer=answer.strip(),
        solution=solution.strip(),
        meta=meta,
    )


@dataclass
class MathTask(Task):
    """MATH with math-verify grading (`time_limit` CPU seconds per comparison try, see
    `math_grader`) and the steps of `splitter`: "whole-math" (`steps.split_math_steps`: sentence
    and line steps, math blocks kept whole) or "paper" (`paper_steps`: the official VinePPO
    splitter's boundaries)."""

    time_limit: float = DEFAULT_TIME_LIMIT
    splitter: str = "whole-math"

    def __post_init__(self):
        if self.splitter not in _SPLIT:
            raise ValueError(f"splitter must be one of {', '.join(SPLITTERS)}; got {self.splitter!r}")
        if not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 CPU seconds; got {self.time_limit!r}")

    def _grade(self, response: str, example: Example) -> Grade:
        return judge_math(response, example.answer, self.time_limit)

    def _split(self, response: str) -> list[str]:
        return _SPLIT[self.splitter](response)

    def final_answer(self, response: str) -> str | None:
        answer = extract_math_answer(response)
        return None if answer is None else "".join(answer.split())
