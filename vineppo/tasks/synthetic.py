"""Synthetic multi-step arithmetic: the embedded default task, small enough for a CPU.

A problem is a start value and a chain of operations written as one expression, evaluated left
to right; the solution does one operation per line, so an error happens in one identifiable step
and later steps inherit it:

    question: 7 + 8 - 6 * 2
    solution: 7 + 8 = 15
              15 - 6 = 9
              9 * 2 = 18
              #### 18

The question spells every operand exactly as the solution lines do and in the same order, so
copying the next operand is a regular pattern a tiny character-level model learns quickly, and
sequences stay short (cheap training steps). Every intermediate value stays in [0, max_value]. Train
and test problems are drawn from two seeded streams of the same distribution; no test question
appears in train, and the test set does not depend on num_train. Test problems are distinct; train
problems may repeat, so that a small part of the problem space (there are far fewer two-operation
problems than three-operation ones) keeps its share of the train split instead of running out
and leaving the train split to the larger part.

Demonstrations can be imperfect. The train split's solutions (what SFT imitates) may come from a
careless teacher who, with probability ``early_answer``, writes ``#### <value>`` one operation
before the end, and who, with probability ``carry_slip``, forgets the carry of a step that
crosses a multiple of ten (``17 + 5 = 12``, ``23 - 5 = 28``) and goes on from the wrong value.
Answers and rewards stay exact, so a policy warm-started on these demonstrations has something
to learn from reward alone: which of its two habits at such a step pays off. That is credit
assignment in its plainest form; one step of a correct-looking solution decides the outcome.
Test solutions are always exact.

The carry-line variant (``carry_line`` > 0; preset configs/tiny-carry-line.yaml) makes the slip a
consequence of a choice the policy makes at that step. Before a +/- step whose tens digit
changes, the teacher either writes the units column on its own line first (``c 7 + 5 = 12``,
``c 13 - 5 = 8`` for a borrow), with probability ``carry_line``, and then the step exactly, or
writes the step directly and, with probability ``carry_slip``, forgets the carry:

    question: 17 + 5 - 6 + 9
    solution: c 7 + 5 = 12        <- carry line written: the next line is exact
              17 + 5 = 22
              22 - 6 = 16
              16 + 9 = 15          <- no carry line: slipped (the tens digit kept)
              #### 15

SFT on this mixed distribution teaches the tiny model both habits at a carry step, and the
slip rate of each. The reward is only the final answer's correctness, so a policy has to find
out, from reward alone, which of its choices at which of 4-8 steps decided the outcome.

Three disjoint problem streams: train (SFT and RL prompts), validation (``eval_split="val"``
puts it where the test split is read, to choose settings) and test (held out). Train excludes
every validation and test question; validation excludes every test question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from vineppo.tasks.base import Example, Grade, Task
from vineppo.tasks.grading import extract_final_integer, grade_integer
from vineppo.tasks.steps import split_newline_steps

_MAX_ATTEMPTS_PER_PROBLEM = 50
# Bumped whenever the same knobs and seed produce different problems or demonstrations, so caches
# keyed by the knobs (SFT checkpoints) are not reused across generator changes.
GENERATOR_VERSION = 3
EVAL_SPLITS = ("test", "val")


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs. Per-step accuracy falls with operand size (more carries) and the
    problem accuracy falls roughly geometrically with the number of steps. The defaults (2-3
    additions/subtractions of one-digit operands, values up to 30) are sized for a tiny
    character-level model trained for minutes on a CPU: it learns the format at once and the
    arithmetic only partly."""

    num_steps: int = 3  # operations per problem (the most)
    min_steps: int | None = None  # the fewest operations (None: num_steps - 1, at least 1)
    max_operand: int = 9  # start value and +/- operands are drawn from [1, max_operand]
    max_multiplier: int = 1  # "* k" with k in [2, max_multiplier] (< 2 disables it)
    max_value: int = 30  # every intermediate result stays in [0, max_value]
    carry_slip: float = 0.0  # train demonstrations forget a carry/borrow with this probability
    early_answer: float = 0.0  # train demonstrations answer before the last operation with this probability
    carry_line: float = 0.0  # train demonstrations write a units-column line before a carry step
    num_train: int = 20_000
    num_test: int = 500  # also the size of the validation split
    eval_split: str = "test"  # "val": the task's test examples are the validation split

    @property
    def fewest_steps(self) -> int:
        return max(1, self.num_steps - 1) if self.min_steps is None else self.min_steps

    def __post_init__(self):
        lo = self.fewest_steps
        if not 1 <= lo <= self.num_steps:
            raise ValueError(f"need 1 <= min_steps <= num_steps, got {lo} and {self.num_steps}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError("need 1 <= max_operand <= max_value")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        for name in ("carry_slip", "early_answer", "carry_line"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError("num_train and num_test must be >= 0")


def _problem(rng: random.Random, cfg: SyntheticConfig) -> tuple[int, list[tuple[str, int]]]:
    """A start value and its operations [(op, operand)], every exact intermediate in [0, max_value]."""
    steps = rng.randint(cfg.fewest_steps, cfg.num_steps)
    start = value = rng.randint(1, cfg.max_operand)
    ops = []
    for _ in range(steps):
        choices = []
        if value + 1 <= cfg.max_value:
            choices.append("+")
        if value >= 1:
            choices.append("-")
        if cfg.max_multiplier >= 2 and 1 <= value and value * 2 <= cfg.max_value:
            choices.append("*")
        op = rng.choice(choices)
        if op == "+":
            x = rng.randint(1, min(cfg.max_operand, cfg.max_value - value))
        elif op == "-":
            x = rng.randint(1, min(cfg.max_operand, value))
        else:
            x = rng.randint(2, min(cfg.max_multiplier, cfg.max_value // value))
        ops.append((op, x))
        value = _apply(value, op, x)
    return start, ops


def _apply(value: int, op: str, x: int) -> int:
    return value + x if op == "+" else value - x if op == "-" else value * x


def _carries(value: int, op: str, new: int) -> bool:
    return op in "+-" and min(value, new) >= 0 and new // 10 != value // 10


def carry_line_text(value: int, op: str, x: int) -> str:
    """The units column of a carry (+) or borrow (-) step: ``c 7 + 5 = 12``, ``c 13 - 5 = 8``."""
    u = value % 10
    if op == "+":
        return f"c {u} + {x} = {u + x}"
    return f"c {u + 10} - {x} = {u + 10 - x}"


def _solution_lines(start: int, ops: list[tuple[str, int]], slip: float = 0.0,
                    rng: random.Random | None = None, carry_line: float = 0.0) -> tuple[list[str], int]:
    """One line per operation and the value reached. With `carry_line` > 0, a +/- step whose tens
    digit changes is preceded by its units-column line with that probability (1.0: always), and
    such a step is written exactly. With `slip` > 0, a carry step written without that line
    forgets the carry (or borrow) with probability `slip`, and later lines continue from the
    written value, as a careless person's would."""
    value, lines = start, []
    for op, x in ops:
        new = _apply(value, op, x)
        carries = _carries(value, op, new)
        lined = carries and carry_line > 0 and (carry_line >= 1.0 or rng.random() < carry_line)
        if lined:
            lines.append(carry_line_text(value, op, x))
        elif slip and carries and rng.random() < slip:
            new = value // 10 * 10 + new % 10    # the tens digit of `value`, unchanged
        lines.append(f"{value} {op} {x} = {new}")
        value = new
    return lines, value


def _generate(rng: random.Random, cfg: SyntheticConfig, count: int, exclude: set[str], split: str,
              distinct: bool, careless: bool = False, slip_rng: random.Random | None = None):
    examples: list[Example] = []
    seen = set(exclude)
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_PROBLEM * (count + 10):
            kind = "distinct " if distinct else ""
            raise ValueError(f"only {len(examples)} {kind}{split} problems found for {cfg} "
                             f"(outside the {len(exclude)} excluded); widen the knobs")
        start, ops = _problem(rng, cfg)
        question = " ".join([str(start)] + [f"{op} {x}" for op, x in ops])
        if question in seen:
            continue
        if distinct:
            seen.add(question)
        answer = _solution_lines(start, ops)[1]
        # slips draw from their own stream, so the problems never depend on the teacher's care
        written_ops = ops
        if careless and cfg.early_answer and slip_rng.random() < cfg.early_answer:
            written_ops = ops[:-1]
        if careless:
            lines, written = _solution_lines(start, written_ops, cfg.carry_slip, slip_rng, cfg.carry_line)
        else:   # the careful solution: a carry line at every carry step of the carry-line variant
            lines, written = _solution_lines(start, written_ops, carry_line=1.0 if cfg.carry_line else 0.0)
        value, carry_steps = start, 0
        for op, x in ops:
            carry_steps += _carries(value, op, _apply(value, op, x))
            value = _apply(value, op, x)
        examples.append(
            Example(
                id=f"synthetic/{split}/{len(examples)}",
                question=question,
                answer=str(answer),
                solution="\n".join(lines + [f"#### {written}"]),
                meta={"num_steps": len(lines), "num_ops": len(ops), "carry_steps": carry_steps,
                      "carry_lines": sum(line.startswith("c ") for line in lines),
                      "demonstration_correct": written == answer},
            )
        )
    return examples


def generate_all_splits(cfg: SyntheticConfig, seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test), deterministic in (cfg, seed) and pairwise disjoint in questions.
    The test split depends only on the problem knobs and the seed; the validation split (as many
    problems as the test split) on those and the test split. Only train solutions carry the
    teacher's slips (``carry_slip``, ``early_answer``, ``carry_line``)."""
    test = _generate(random.Random(f"synthetic-test-{seed}"), cfg, cfg.num_test, set(), "test", distinct=True)
    test_questions = {e.question for e in test}
    val = _generate(random.Random(f"synthetic-val-{seed}"), cfg, cfg.num_test, test_questions, "val",
                    distinct=True)
    held_out = test_questions | {e.question for e in val}
    train = _generate(
        random.Random(f"synthetic-train-{seed}"), cfg, cfg.num_train, held_out, "train",
        distinct=False, careless=True, slip_rng=random.Random(f"synthetic-train-slips-{seed}"),
    )
    return train, val, test


def generate_splits(cfg: SyntheticConfig, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, evaluation) examples: the evaluation split is the test split, or the validation
    split when ``cfg.eval_split == "val"``; train excludes both."""
    train, val, test = generate_all_splits(cfg, seed)
    return train, (val if cfg.eval_split == "val" else test)


_STEP_LINE = re.compile(r"^(-?\d+) ([-+*]) (\d+) = (-?\d+)$")


def response_habits(question: str, response: str) -> dict:
    """What a response did at each operation, judged step by step from its own values: counts of
    carry steps (a +/- step whose tens digit changes), of those written after a carry line
    (``lined``), of forgotten carries with and without that line (``slip_lined``,
    ``slip_unlined``), of other wrong steps (``other_errors``), of carry lines before steps with
    no carry (``needless_lines``), and ``format_error`` (a line that is not a step, a missing
    operation or a missing answer)."""
    out = dict(carry_steps=0, lined=0, slip_lined=0, slip_unlined=0, other_errors=0, needless_lines=0,
               format_error=False)
    start, *rest = question.split(" ")
    ops = list(zip(rest[::2], rest[1::2]))
    lines = [line.strip() for line in response.strip().split("\n") if line.strip()]
    i, value = 0, int(start)
    for op, x in ops:
        lined = i < len(lines) and lines[i].startswith("c ")
        i += lined
        m = _STEP_LINE.match(lines[i]) if i < len(lines) else None
        if m is None or m.group(2) != op or m.group(3) != x:
            out["format_error"] = True
            return out
        a, written = int(m.group(1)), int(m.group(4))
        exact = _apply(a, op, int(x))
        carry = _carries(a, op, exact)
        out["carry_steps"] += carry
        out["lined"] += carry and lined
        out["needless_lines"] += lined and not carry
        if written != exact:
            if carry and written == a // 10 * 10 + exact % 10:
                out["slip_lined" if lined else "slip_unlined"] += 1
            else:
                out["other_errors"] += 1
        if a != value:
            out["other_errors"] += 1     # did not go on from its own previous value
        value = written
        i += 1
    if i >= len(lines) or not lines[i].startswith("####"):
        out["format_error"] = True
    return out


@dataclass
class SyntheticTask(Task):
    """Synthetic arithmetic with newline steps and exact integer grading after `####`."""

    config: SyntheticConfig = SyntheticConfig()

    def _grade(self, response: str, example: Example) -> Grade:
        return Grade(grade_integer(response, example.answer))

    def _split(self, response: str) -> list[str]:
        return split_newline_steps(response)

    def final_answer(self, response: str) -> str | None:
        value = extract_final_integer(response)
        return None if value is None else str(value)


def load_synthetic(seed: int = 0, max_steps: int = 25, **knobs) -> SyntheticTask:
    """The synthetic task; `knobs` are SyntheticConfig fields."""
    unknown = set(knobs) - set(SyntheticConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown synthetic knobs {sorted(unknown)}; "
            f"expected {sorted(SyntheticConfig.__dataclass_fields__)}"
        )
    cfg = SyntheticConfig(**knobs)
    train, test = generate_splits(cfg, seed)
    return SyntheticTask(
        name="synthetic", train=train, test=test, max_steps=max_steps, config=cfg,
        chat_instruction=("Evaluate left to right, one operation per line, "
                          + ("optionally the units column of a carry first as 'c <a> <op> <b> = <c>', "
                             if cfg.carry_line else "")
                          + "then write '#### <answer>'."),
    )
