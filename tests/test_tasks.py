"""Tests for jaxrl_geom.tasks: prompts checked by independent parsing, rewards by hand."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxrl_geom.tasks import (
    ArithmeticTask,
    Example,
    GSM8KTask,
    KVRetrievalTask,
    extract_final_answer,
    get_task,
    gsm8k_reward,
    task_names,
)
from jaxrl_geom.tokenizers import CharTokenizer

_KV_PROMPT = re.compile(r"((?:[a-z]+=\d+;)*[a-z]+=\d+)\n\?([a-z]+)=")


def _parse_kv(prompt):
    """Independent parser of the documented format: pairs, then '?key='."""
    match = _KV_PROMPT.fullmatch(prompt)
    assert match, prompt
    pairs = [p.split("=") for p in match.group(1).split(";")]
    return pairs, match.group(2)


# ---------------------------------------------------------------- registry


def test_registry():
    assert task_names() == ["arithmetic", "gsm8k", "kv_retrieval", "worked_addition"]
    assert isinstance(get_task("kv_retrieval", num_pairs=6), KVRetrievalTask)
    assert get_task("arithmetic").name == "arithmetic"
    with pytest.raises(
        ValueError, match=r"'arithmetic', 'gsm8k', 'kv_retrieval', 'worked_addition'"
    ):
        get_task("sudoku")
    with pytest.raises(ValueError, match=r"no arguments \['digits'\].*num_digits"):
        get_task("arithmetic", digits=3)
    with pytest.raises(ValueError, match="path"):
        get_task("gsm8k")


# ---------------------------------------------------------------- kv retrieval


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_pairs": 8}, {"num_pairs": 3, "key_len": 1, "value_len": 4}]
)
def test_kv_answer_is_value_of_queried_key(kwargs):
    task = KVRetrievalTask(**kwargs)
    rng = np.random.default_rng(0)
    queried = set()
    for example in task.sample_prompts(rng, 200):
        pairs, key = _parse_kv(example.prompt)
        keys = [k for k, _ in pairs]
        assert len(pairs) == task.num_pairs
        assert len(set(keys)) == len(keys)  # distinct keys
        assert all(len(k) == task.key_len for k in keys)
        assert all(len(v) == task.value_len for _, v in pairs)
        assert example.answer == dict(pairs)[key]
        queried.add(keys.index(key))
    assert queried == set(range(task.num_pairs))  # every depth gets queried


def test_kv_context_grows_with_num_pairs():
    rng = np.random.default_rng(1)
    lengths = [
        len(KVRetrievalTask(num_pairs=m, key_len=2).sample_prompts(rng, 1)[0].prompt)
        for m in (1, 2, 4, 8, 32)
    ]
    assert lengths == sorted(lengths) and len(set(lengths)) == 5
    # hand count for 2-letter keys, 2-digit values: "ab=12" + ";" per pair, "\n?ab=" query
    assert lengths[0] == 5 + 5 and lengths[1] == 2 * 5 + 1 + 5


@pytest.mark.parametrize("context_chars", [10, 64, 100, 1000])
def test_kv_context_chars_target(context_chars):
    task = KVRetrievalTask(context_chars=context_chars, key_len=2)
    (example,) = task.sample_prompts(np.random.default_rng(2), 1)
    pairs, _ = _parse_kv(example.prompt)
    # the prompt fits, and one more pair ("ab=12;", 6 characters) would not
    assert len(example.prompt) <= context_chars < len(example.prompt) + 6
    assert len(pairs) == task.pairs_per_prompt


def test_kv_deterministic_given_rng():
    a = KVRetrievalTask().sample_prompts(np.random.default_rng(5), 4)
    b = KVRetrievalTask().sample_prompts(np.random.default_rng(5), 4)
    assert a == b


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("93", 1.0),
        (" 93 \n", 1.0),
        ("\n93", 1.0),
        ("93\nab=07", 1.0),
        ("9", 0.0),
        ("930", 0.0),
        ("07", 0.0),
        ("93;", 0.0),
        ("", 0.0),
    ],
)
def test_kv_reward(completion, reward):
    example = Example(prompt="ab=07;mc=93\n?mc=", answer="93")
    assert KVRetrievalTask().reward(completion, example) == reward


def test_kv_validation():
    with pytest.raises(ValueError, match="distinct keys"):
        KVRetrievalTask(num_pairs=27, key_len=1)
    with pytest.raises(ValueError, match="separators"):
        KVRetrievalTask(key_alphabet="ab=")
    # one pair "a=12" plus the query "\n?a=" is 8 characters
    with pytest.raises(ValueError, match="at least 8"):
        KVRetrievalTask(context_chars=7)
    with pytest.raises(ValueError, match="num_pairs"):
        KVRetrievalTask(num_pairs=0)
    with pytest.raises(ValueError, match="raise key_len"):
        KVRetrievalTask(context_chars=1000)  # 199 one-letter keys do not exist


# ---------------------------------------------------------------- arithmetic

_ARITH_PROMPT = re.compile(r"(\d+)([+\-*])(\d+)=")


@pytest.mark.parametrize(
    "num_digits, operations", [(1, ("+",)), (2, ("+",)), (3, ("+", "-", "*")), (5, ("*",))]
)
def test_arithmetic_answers_match_python(num_digits, operations):
    task = ArithmeticTask(num_digits=num_digits, operations=operations)
    seen_ops = set()
    for example in task.sample_prompts(np.random.default_rng(3), 300):
        a, op, b = _ARITH_PROMPT.fullmatch(example.prompt).groups()
        assert int(a) < 10**num_digits and int(b) < 10**num_digits
        assert int(example.answer) == eval(f"{int(a)}{op}{int(b)}")  # noqa: S307
        seen_ops.add(op)
    assert seen_ops == set(operations)


@pytest.mark.parametrize(
    "completion, exact, partial",
    [
        ("95", 1.0, 1.0),
        (" 95\n12+3=", 1.0, 1.0),
        ("095", 0.0, 0.5 * 2 / 3),  # right-aligned: 5, 9 match, 0 vs nothing -> 2/3
        ("85", 0.0, 0.5 * 1 / 2),  # units digit right
        ("59", 0.0, 0.0),
        ("-95", 0.0, 0.5 * 2 / 3),
        ("nine", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_arithmetic_reward(completion, exact, partial):
    example = Example(prompt="37+58=", answer="95")
    assert ArithmeticTask().reward(completion, example) == exact
    assert ArithmeticTask(partial_credit=True).reward(completion, example) == pytest.approx(partial)


def test_arithmetic_validation():
    with pytest.raises(ValueError, match="non-empty subset"):
        ArithmeticTask(operations=("/",))
    with pytest.raises(ValueError, match="num_digits"):
        ArithmeticTask(num_digits=0)
    with pytest.raises(ValueError, match="partial_scale"):
        ArithmeticTask(partial_scale=1.0)
    assert ArithmeticTask(operations=["+", "-"]).operations == ("+", "-")  # list from configs


# ---------------------------------------------------------------- shared task contract


_SYNTHETIC = [
    KVRetrievalTask(),
    KVRetrievalTask(num_pairs=16, key_len=3, value_len=3),
    KVRetrievalTask(context_chars=500, key_len=2),
    ArithmeticTask(),
    ArithmeticTask(num_digits=4, operations=("+", "-", "*")),
]


@pytest.mark.parametrize("task", _SYNTHETIC, ids=repr)
def test_synthetic_tasks_encodable_and_demonstrations_score_one(task):
    tok = CharTokenizer()
    for example in task.sample_prompts(np.random.default_rng(4), 100):
        demo = task.demonstration(example)
        assert tok.can_encode(example.prompt) and tok.can_encode(demo)
        assert tok.decode(tok.encode(example.prompt + demo)) == example.prompt + demo
        assert task.reward(demo, example) == 1.0
        assert task.reward(demo + "\n", example) == 1.0


def test_default_demonstrations_fit_default_generation_budget():
    # DESIGN default max_new_tokens is 8: answer + EOS must fit.
    for task in (KVRetrievalTask(), ArithmeticTask()):
        for example in task.sample_prompts(np.random.default_rng(6), 200):
            assert len(task.demonstration(example)) + 1 <= 8


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_sample_prompts_rejects_bad_n(n):
    with pytest.raises(ValueError, match="non-negative int"):
        ArithmeticTask().sample_prompts(np.random.default_rng(0), n)


# ---------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "text, expected",
    [
        # \boxed wins, nested braces balanced, last box taken
        (r"First \boxed{3}, finally \boxed{\frac{3}{4}}.", "0.75"),
        (r"So she pays \boxed{\$1,200}. Then 5 more.", "1200"),
        (r"\boxed{{12}}", "12"),
        (r"\boxed{-\dfrac{3}{2}}", "-1.5"),
        (r"\boxed{x = 7}", "7"),
        (r"\boxed{5\text{ apples}}", "5"),
        (r"\boxed{1/3}", "1/3"),  # not a finite decimal: kept as a fraction
        (r"\boxed{0}", "0"),
        # GSM8K "####"
        ("He has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234,567", "1234567"),
        ("#### -42\n\nQuestion: 5 more", "-42"),
        # "the answer is"
        ("The answer is $18. Next time 3 more.", "18"),
        ("Final answer: 2.50", "2.5"),
        ("so the ANSWER IS -0.5.", "-0.5"),
        # last number fallback
        ("5 - 3 = 2", "2"),
        ("costs 10.00 dollars", "10"),
        ("about 50% of them", "50"),
        ("In 2021 she had 1,000,000 coins.", "1000000"),
        ("x-3 and y", "3"),
        ("There is no number here.", None),
        ("", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        (r"\boxed{72}", "72", 1.0),
        ("The answer is 3.0", "3", 1.0),
        ("#### 1,000", "Some work <<2*500=1000>>.\n#### 1000", 1.0),
        ("so 0.50", "1/2", 1.0),
        (r"\boxed{-7}", "7", 0.0),
        ("I don't know", "72", 0.0),
        ("72.5", "72", 0.0),
    ],
)
def test_gsm8k_reward(completion, answer, reward):
    assert gsm8k_reward(completion, answer) == reward


def test_gsm8k_reward_needs_numeric_reference():
    with pytest.raises(ValueError, match="holds no number"):
        gsm8k_reward("42", "forty-two")


@pytest.fixture
def gsm8k_file(tmp_path):
    records = [
        {
            "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
            "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
            "In total 48+24 = <<48+24=72>>72 clips.\n#### 72",
        },
        {
            "question": "A shirt costs $1,250. What does it cost?",
            "answer": "It is $1,250.\n#### 1,250",
        },
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_gsm8k_task(gsm8k_file):
    task = get_task("gsm8k", path=str(gsm8k_file))
    assert isinstance(task, GSM8KTask) and len(task.examples) == 2
    first, second = task.examples
    assert first.answer == "72" and second.answer == "1250"
    assert first.prompt.startswith("Natalia sold 48") and r"\boxed{}" in first.prompt
    demo = task.demonstration(first)
    assert "<<" not in demo and demo.endswith(r"\boxed{72}.")
    assert task.reward(demo, first) == 1.0
    assert task.reward("It is 71.", first) == 0.0
    sampled = task.sample_prompts(np.random.default_rng(0), 10)
    assert len(sampled) == 10 and set(sampled) <= set(task.examples)
    assert len(GSM8KTask(path=str(gsm8k_file), max_examples=1).examples) == 1


def test_gsm8k_task_errors(tmp_path):
    with pytest.raises(ValueError, match="not found.*nothing is downloaded"):
        GSM8KTask(path=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 .*#### N"):
        GSM8KTask(path=str(bad))
    with pytest.raises(ValueError, match="question"):
        GSM8KTask(path=str(bad), prompt_template="no field")
