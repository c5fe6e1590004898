"""The task interface: examples, prompts, SFT targets, grading and step splitting.

The Task protocol, all the package asks of a task (what a ``--task.factory`` must return; the
easiest way is to subclass `Task` and implement `_grade` and `_split`):

    name: str                     shown in logs and run folders
    train, test: list[Example]    the problems RL draws from and evaluation scores
    max_steps: int                default cap on steps per response (merged evenly above it)
    prompt(example, tokenizer=None, template="plain") -> str
                                  the text before the response; "plain" for base/SFT models, "chat"
                                  for the tokenizer's chat template (with `chat_instruction`)
    sft_target(example) -> str    what SFT teaches after the plain prompt (" " + solution)
    grade(response, example) -> float
                                  the reward, in [0, 1] (any value in between is fine: VinePPO's
                                  values are means of rewards); never raises on model output
    split_steps(response, max_steps=None) -> list[str]
                                  reasoning steps, exact substrings: "".join(steps) == response
    final_answer(response) -> str | None
                                  a normal form of the final answer, for majority voting
    grader_stats() -> GraderStats counts of gradings (and budget time-outs) since the last call

`--task.reward module:function` wraps any task so that `grade` is a plain
``(response_text, example) -> float`` (`vineppo.tasks.rewards`); `--task.name custom` builds a
task from settings alone (`vineppo.tasks.custom`). README "Your own task" has an example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vineppo.tasks.steps import merge_steps

PLAIN_TEMPLATE = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
TEMPLATES = ("plain", "chat")


@dataclass
class Example:
    """One problem. `answer` is the gold final answer as text; `solution` is the reference
    solution in the paper's SFT format (ends with `#### N`, or contains `\\boxed{}` for MATH)."""

    id: str
    question: str
    answer: str
    solution: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. MATH subject and level


@dataclass
class Grade:
    """One grading: the reward, and whether the grader ran out of its budget (then the reward is
    0) or needed its second try."""

    reward: float
    timed_out: bool = False
    retried: bool = False


@dataclass
class GraderStats:
    """Counts of gradings since the last `Task.grader_stats()` call."""

    graded: int = 0  # responses graded
    timed_out: int = 0  # of those, scored 0 because both tries ran out of the grader's budget
    retried: int = 0  # of those, ran out of budget once and were graded again


@dataclass
class Task:
    """A dataset with its prompt format, grader and step splitter.

    Subclasses implement `_grade` (returning a `Grade`) and `_split` (uncapped step splitting);
    everything else is shared. `num_skipped` counts malformed rows dropped at load time when
    loading with on_error="skip".

    `grader_stats()` returns a `GraderStats` of the gradings since its last call (graded,
    timed_out, retried) and starts counting afresh, so a trainer can log them per iteration: a
    grader that runs out of its budget gives 0, and that must be visible, never silent. Only the
    MATH grader has a budget; the others never time out. The counts are plain integers, exact
    when one thread grades at a time.
    """

    name: str
    train: list[Example]
    test: list[Example]
    max_steps: int = 25
    num_skipped: int = 0
    # Appended to the question for instruct models (template="chat"), so they answer in a form the
    # grader reads.
    chat_instruction: str = ""
    _stats: GraderStats = field(default_factory=GraderStats, init=False, repr=False,
                                compare=False)

    def prompt(self, example: Example, tokenizer=None, template: str = "plain") -> str:
        """The prompt text. "plain": the paper's template for base/SFT models; "chat": the
        tokenizer's chat template with a generation prompt (instruct models)."""
        if template == "plain":
            return PLAIN_TEMPLATE.format(question=example.question)
        if template == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("template='chat' needs a tokenizer that has a chat_template")
            content = example.question
            if self.chat_instruction:
                content = f"{content}\n\n{self.chat_instruction}"
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")

    def sft_target(self, example: Example) -> str:
        """Text the model should produce after the plain prompt: a space, then the solution."""
        return " " + example.solution

    def grade(self, response: str, example: Example) -> float:
        """1.0 when the response's final answer matches the gold answer, else 0.0. Never raises
        on model output."""
        g = self._grade(response, example)
        self._stats.graded += 1
        self._stats.timed_out += g.timed_out
        self._stats.retried += g.retried
        return g.reward

    def final_answer(self, response: str) -> str | None:
        """The response's final answer in a normal form, for majority voting over samples (two
        responses with the same final answer get the same grade); None when it has none."""
        return None

    def grader_stats(self) -> GraderStats:
        """The grading counts since the last call (see the class docstring)."""
        stats, self._stats = self._stats, GraderStats()
        return stats

    def _grade(self, response: str, example: Example) -> Grade:
        raise NotImplementedError

    def _split(self, response: str) -> list[str]:
        raise NotImplementedError

    def split_steps(self, response: str, max_steps: int | None = None) -> list[str]:
        """Reasoning steps as exact substrings ("".join(steps) == response), at most `max_steps`
        of them (default: the task's `max_steps`; 0 = no cap). Over the cap, evenly spaced
        boundaries are kept and the steps between them merged (see `merge_steps`)."""
        if not isinstance(response, str):
            raise ValueError(f"response must be a str, got {type(response).__name__}")
        cap = self.max_steps if max_steps is None else max_steps
        steps = self._split(response)
        return merge_steps(steps, cap) if cap and cap > 0 else steps


def prompt_ids(task: Task, example: Example, tokenizer, template: str = "plain") -> list[int]:
    """The prompt's token ids: `task.prompt` encoded. Chat-templated text already carries its
    special tokens (BOS included), so none are added for template "chat"; the plain template
    gets the tokenizer's usual ones. ValueError when the prompt encodes to no tokens."""
    text = task.prompt(example, tokenizer, template)
    ids = tokenizer(text, add_special_tokens=(template != "chat"))["input_ids"]
    if not ids:
        raise ValueError(f"prompt {text[:60]!r} encodes to no tokens")
    return list(ids)
