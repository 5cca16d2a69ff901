"""Sandboxed code execution and verifiable rewards."""

import os
import uuid

import pytest

from gemma3.train import rewards, tasks
from gemma3.train.sandbox import Limits, run_python

FAST = Limits(wall_s=3, cpu_s=2, memory_bytes=512 << 20)
ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


def test_good_program_passes_and_output_is_captured():
    result = run_python("import sys; print(sum(range(10))); print(input())", FAST, stdin="hi\n")
    assert result.ok and result.stdout.split() == ["45", "hi"]


@pytest.mark.parametrize("name,program,reasons", [
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", {"process limit", "timeout", "cpu limit"}),
    ("infinite loop", "def add(a, b):\n    while True:\n        pass\nadd(1, 2)\n", {"timeout", "cpu limit"}),
    ("10 GB allocation", "x = bytearray(10 * 1024 ** 3)\n", {"memory limit"}),
    ("sleep forever", "import time\ntime.sleep(1000)\n", {"timeout"}),
    ("large file", "open('f', 'w').write('x' * (10 << 20))\n", {"file size limit"}),
])
def test_hostile_programs_get_zero_reward_with_a_reason(name, program, reasons):
    score = rewards.run_tests(program, ADD_TESTS, FAST)
    assert score.value == 0 and score.reason in reasons, (name, score)
    # The caller survives, and no child is left behind in a sandbox's process group.
    assert rewards.run_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, FAST) == rewards.Score(1.0, "2/2 tests passed")


def test_nothing_is_written_outside_the_work_directory():
    targets = [f"/tmp/gemma3-escape-{uuid.uuid4().hex}", f"/var/tmp/gemma3-escape-{uuid.uuid4().hex}",
               os.path.join(os.getcwd(), f"gemma3-escape-{uuid.uuid4().hex}"),
               os.path.expanduser(f"~/gemma3-escape-{uuid.uuid4().hex}")]
    program = "".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\n" for t in targets)
    program += "open('inside', 'w').write('ok')\nprint(open('inside').read())\n"
    result = run_python(program, FAST)
    assert result.ok and result.stdout.strip().endswith("ok"), result
    escaped = [t for t in targets if os.path.exists(t)]
    for t in escaped:
        os.remove(t)
    if os.geteuid() != 0 and "private tmp" not in result.isolation:
        pytest.skip("not root and no mount namespace: writes outside the work directory are not prevented")
    assert not escaped


def test_network_is_unreachable_where_namespaces_are_allowed():
    result = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n", FAST)
    if "network" not in result.isolation:
        pytest.skip("the kernel refused a network namespace here")
    assert not result.ok and ("unreachable" in result.stderr or "Network" in result.stderr)


def test_code_reward_partial_credit_and_forged_output():
    code = rewards.code_reward(FAST)
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 5\n```"
    assert code(good, {"tests": ADD_TESTS}).value == 1
    assert code(half, {"tests": ADD_TESTS}).value == 0.5
    forged = "import sys\nprint('x 2 2')\nsys.exit(0)\n"  # exits before the tests; cannot know the nonce
    assert code(forged, {"tests": ADD_TESTS}).value == 0
    syntax = code("def add(a, b) return", {"tests": ADD_TESTS})
    assert syntax.value == 0 and "SyntaxError" in syntax.reason


def test_math_reward_normalises_numbers():
    sample = {"answer": "1234.5"}
    assert rewards.math_reward("so the answer is 1,234.50.", sample).value == 1
    assert rewards.math_reward("\\boxed{2469/2}", sample).value == 1
    assert rewards.math_reward("12", sample).reason == "wrong answer 12 (want 1234.5)"
    assert rewards.math_reward("no idea", sample).reason == "no answer found"
    assert rewards.normalise_number("-3/6") == "-0.5" and rewards.normalise_number("2/6") == "1/3" and rewards.normalise_number("7.0") == "7"


def test_math_verify_judges_symbolic_answers():
    pytest.importorskip("math_verify")
    assert rewards.math_reward("The answer is $\\frac{1}{2}$", {"answer": "0.5"}, use_math_verify=True).value == 1
    assert rewards.math_reward("The answer is $3$", {"answer": "0.5"}, use_math_verify=True).value == 0


def test_weighted_combination_keeps_components():
    combined = rewards.Weighted({"math": (1.0, rewards.math_reward),
                                 "format": (0.25, rewards.format_reward(r"^-?\d+$", full=True))})
    total, parts = combined("42", {"answer": "42"})
    assert total == 1.25 and parts["math"].value == 1 and parts["format"].value == 1
    total, parts = combined("it is 41", {"answer": "42"})
    assert total == 0 and parts["format"].reason.startswith("does not match")


def test_tasks_are_seeded_and_scored():
    a, b = tasks.arithmetic(20, seed=3), tasks.arithmetic(20, seed=3)
    assert a == b and a != tasks.arithmetic(20, seed=4)
    for s in a:
        assert tasks.task_reward(s["answer"] + "\nmore text 99", s).value == 1
        assert tasks.task_reward(str(int(s["answer"]) + 1), s).value == 0
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load("nope", 3)


def test_fewshot_arithmetic_prompts_end_where_the_answer_goes():
    samples = tasks.load("arithmetic", 30, seed=2, digits=1, ops="+-", style="fewshot")
    for s in samples:
        question = s["prompt"].rsplit("Q: ", 1)[1]
        a, op, b = question.removesuffix("\nA:").split()
        assert s["prompt"].endswith("\nA:") and op in "+-"
        assert int(s["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and max(int(a), int(b)) < 10
        assert tasks.task_reward(f" {s['answer']}\nQ: 1 + 1", s).value == 1  # the base model's continuation
    with pytest.raises(ValueError, match="prompt style"):
        tasks.arithmetic(2, style="chat")
    with pytest.raises(ValueError, match="operators"):
        tasks.arithmetic(2, ops="/")


def test_reasoning_gym_task_uses_its_scorer():
    pytest.importorskip("reasoning_gym")
    samples = tasks.load("reasoning-gym:basic_arithmetic", 3, seed=1)
    assert all(tasks.task_reward(s["answer"], s).value == 1 for s in samples)
    assert tasks.task_reward("banana", samples[0]).value == 0


def test_held_out_problems_are_distinct_and_never_trained_on():
    samples = tasks.arithmetic(400, seed=0, digits=1, ops="+-", style="fewshot")  # 200 problems: repeats
    train, held_out = tasks.split_held_out(samples, 100)
    prompts = [s["prompt"] for s in held_out]
    assert len(prompts) == len(set(prompts)) == 100
    assert train and not set(prompts) & {s["prompt"] for s in train}
    assert len(train) + len(held_out) < len(samples)  # repeats of held-out problems were dropped
    with pytest.raises(ValueError, match="distinct problems"):
        tasks.split_held_out(tasks.arithmetic(500, digits=1, ops="+"), 150)
    with pytest.raises(ValueError, match="no training problems"):
        tasks.split_held_out(tasks.arithmetic(2000, digits=1, ops="+"), 100)  # all 100
