"""Tasks without code: a dataset, its column names, a grader, a step splitter and a prompt.

    task = load_custom_task(TaskConfig(name="custom", path="data/qa.jsonl", question_field="q",
                                       answer_field="a", grader="exact", steps="newline"))

Graders (`GRADERS`, or ``regex:<pattern>``):
    gsm8k-number  the number after the last ``####`` equals the gold answer's number (GSM8K's)
    math-verify   the last ``\\boxed{}`` (or "the answer is ...") is equivalent to the gold
                  answer (MATH's grader, with its CPU-time budget)
    exact         the response's last non-empty line, stripped, equals the gold answer
    regex:<pat>   the first capture group (or the whole match) of the last match of <pat> in the
                  response equals the gold answer, both stripped
Step splitters (`STEP_SPLITTERS`, or ``regex:<pattern>``): newline (GSM8K's), paragraph (at
blank lines), math (MATH's whole-math splitter), regex:<pat> (a step ends after each match).

A regular expression is compiled when the config is checked (a bad one is an error naming the
setting), and at grade / split time it searches only the last `MAX_REGEX_CHARS` characters of a
response (a step splitter: the first), so the work a pattern can do stays bounded; matching
runs under a wall-clock budget of `REGEX_TIME_LIMIT` seconds in the main thread (no match when
it runs out).
"""

from __future__ import annotations

import re
import signal
import threading
from dataclasses import dataclass, field

from vineppo.tasks.base import Example, Grade, Task
from vineppo.tasks.grading import extract_gsm8k_answer, gold_number, grade_gsm8k

GRADERS = ("gsm8k-number", "math-verify", "exact")
STEP_SPLITTERS = ("newline", "paragraph", "math")
MAX_REGEX_CHARS = 4_000      # characters of a response a user pattern searches
MAX_PATTERN_CHARS = 500
REGEX_TIME_LIMIT = 1.0       # wall seconds per regex search (main thread)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")


def compile_user_regex(spec: str, setting_name: str) -> re.Pattern:
    """The pattern of a ``regex:<pattern>`` setting; ValueError naming the setting when it is
    empty, too long or does not compile."""
    pattern = spec[len("regex:"):]
    if not pattern:
        raise ValueError(f"{setting_name}: regex: needs a pattern, e.g. 'regex:Answer: (.+)'")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{setting_name}: the pattern is {len(pattern)} characters; at most "
                         f"{MAX_PATTERN_CHARS}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{setting_name}: bad regular expression {pattern!r}: {e}") from None


def check_grader(spec: str, setting_name: str = "grader") -> None:
    if spec.startswith("regex:"):
        compile_user_regex(spec, setting_name)
    elif spec not in GRADERS:
        raise ValueError(f"{setting_name} must be one of {', '.join(GRADERS)} or regex:<pattern>; got {spec!r}")


def check_splitter(spec: str, setting_name: str = "steps") -> None:
    if spec.startswith("regex:"):
        compile_user_regex(spec, setting_name)
    elif spec not in STEP_SPLITTERS:
        raise ValueError(f"{setting_name} must be one of {', '.join(STEP_SPLITTERS)} or regex:<pattern>; "
                         f"got {spec!r}")


def check_template(template: str, setting_name: str = "prompt") -> None:
    """A plain prompt template must be a format string whose only field is {question}."""
    if not template:
        return
    import string

    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{setting_name}: bad format string {template!r}: {e}") from None
    if names != {"question"}:
        raise ValueError(f"{setting_name} must contain {{question}} and no other field (write {{{{ }}}} for "
                         f"literal braces); got fields {sorted(names)}")


class _RegexTimeout(BaseException):
    pass


def _bounded(fn, *args):
    """fn(*args) under a REGEX_TIME_LIMIT wall budget in the main thread; None when it runs out.
    Elsewhere the input bound (MAX_REGEX_CHARS) is the only limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn(*args)

    def on_alarm(signum, frame):
        raise _RegexTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    prev, _ = signal.setitimer(signal.ITIMER_REAL, REGEX_TIME_LIMIT)
    try:
        return fn(*args)
    except _RegexTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if prev > 0:
            signal.setitimer(signal.ITIMER_REAL, prev)


def _last_match(pattern: re.Pattern, text: str) -> str | None:
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


def _last_line(response: str) -> str | None:
    lines = [ln.strip() for ln in response[-MAX_REGEX_CHARS:].splitlines() if ln.strip()]
    return lines[-1] if lines else None


@dataclass
class CustomTask(Task):
    """A task from settings: `grader` and `steps` as in the module docstring; `template` a format
    string with {question} for the plain prompt (empty = the package's plain template)."""

    grader: str = "exact"
    steps: str = "newline"
    template: str = ""
    time_limit: float = 2.0  # math-verify CPU seconds per comparison try
    _grader_re: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)
    _steps_re: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_grader(self.grader)
        check_splitter(self.steps)
        check_template(self.template, "template")
        if self.grader.startswith("regex:"):
            self._grader_re = compile_user_regex(self.grader, "grader")
        if self.steps.startswith("regex:"):
            self._steps_re = compile_user_regex(self.steps, "steps")

    def prompt(self, example: Example, tokenizer=None, template: str = "plain") -> str:
        if template == "plain" and self.template:
            return self.template.format(question=example.question)
        return super().prompt(example, tokenizer, template)

    def final_answer(self, response: str) -> str | None:
        try:
            if self.grader == "gsm8k-number":
                value = extract_gsm8k_answer(response)
                return None if value is None else str(value)
            if self.grader == "math-verify":
                from vineppo.tasks.math_grader import extract_math_answer

                answer = extract_math_answer(response)
                return None if answer is None else "".join(answer.split())
            if self.grader == "exact":
                return _last_line(response)
            found = _bounded(_last_match, self._grader_re, response[-MAX_REGEX_CHARS:])
            return None if found is None else found.strip()
        except Exception:  # a grader never raises on model output
            return None

    def _grade(self, response: str, example: Example) -> Grade:
        if self.grader == "gsm8k-number":
            return Grade(grade_gsm8k(response, example.answer))
        if self.grader == "math-verify":
            from vineppo.tasks.math_grader import judge_math

            return judge_math(response, example.answer, self.time_limit)
        answer = self.final_answer(response)
        return Grade(float(answer is not None and answer == example.answer.strip()))

    def _split(self, response: str) -> list[str]:
        if not response:
            return [response]
        if self.steps == "newline":
            from vineppo.tasks.steps import split_newline_steps

            return split_newline_steps(response)
        if self.steps == "math":
            from vineppo.tasks.steps import split_math_steps

            return split_math_steps(response)
        if self.steps == "paragraph":
            cuts = [m.end() for m in _PARAGRAPH.finditer(response)]
        else:
            head = response[:MAX_REGEX_CHARS]
            cuts = _bounded(lambda: [m.end() for m in self._steps_re.finditer(head) if m.end() > m.start()]) or []
        bounds = [0] + sorted(c for c in set(cuts) if 0 < c < len(response)) + [len(response)]
        return [response[a:b] for a, b in zip(bounds, bounds[1:])]


def example_maker(question_field: str, answer_field: str, solution_field: str, grader: str, prefix: str):
    """make(record, index, split) -> Example for `loading.to_examples`: ValueError (which the
    loader reports with file and line) when a field is missing or not text."""

    def text_field(record: dict, name: str, required: bool) -> str | None:
        value = record.get(name)
        if value is None:
            if required:
                have = ", ".join(sorted(map(str, record))[:10])
                raise ValueError(f"no field {name!r} (the row has: {have})")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"field {name!r} must be text or a number, got {type(value).__name__}")
        text = str(value).strip()
        if required and not text:
            raise ValueError(f"field {name!r} is empty")
        return text

    def make(record: dict, index: int, split: str) -> Example:
        question = text_field(record, question_field, True)
        answer = text_field(record, answer_field, True)
        solution = text_field(record, solution_field, False) if solution_field else None
        if grader == "gsm8k-number" and gold_number(answer) is None:
            raise ValueError(f"field {answer_field!r} must be a number for grader gsm8k-number; got {answer[:40]!r}")
        if grader == "math-verify":
            from vineppo.tasks.math_grader import readable_gold

            why = readable_gold(answer)
            if why:
                raise ValueError(f"field {answer_field!r}: {why}")
        meta = {"record": {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool))}}
        return Example(id=str(record.get("id") or f"{prefix}/{split}/{index}"), question=question,
                       answer=answer, solution=solution if solution else answer, meta=meta)

    return make


def load_custom_task(cfg) -> CustomTask:
    """The CustomTask a TaskConfig with name "custom" describes. `path` is a file (the test
    split; with `train_path` the train split), a folder with train/test files, or a hub name."""
    from vineppo.tasks.loading import read_rows, to_examples

    if not cfg.path:
        raise ValueError("--task.path: the custom task needs a data file, folder or hub dataset name")
    make = example_maker(cfg.question_field, cfg.answer_field, cfg.solution_field, cfg.grader, "custom")
    sources = {"train": cfg.train_path or cfg.path, "test": cfg.path}
    splits, skipped = {}, 0
    for split in ("train", "test"):
        source = sources[split]   # one file and no train_path: train and test are its problems
        rows = read_rows(source, split, hub_config=cfg.hub_config or None, on_error=cfg.on_error)
        examples, n = to_examples(rows, split, make, cfg.on_error)
        splits[split], skipped = examples, skipped + n
    return CustomTask(name="custom", train=splits["train"], test=splits["test"], num_skipped=skipped,
                      chat_instruction=cfg.instruction, grader=cfg.grader, steps=cfg.steps,
                      template=cfg.prompt, time_limit=cfg.time_limit,
                      **({"max_steps": cfg.max_steps} if cfg.max_steps else {}))
