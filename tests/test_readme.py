"""README.md's Python examples, run as written against a tiny checkpoint with a chat template."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
HUB_ID = "Qwen/Qwen3-30B-A3B-Instruct-2507"  # the model the examples name, swapped for the tiny one


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.slow  # loads a model in bfloat16 and generates a few hundred tokens
def test_every_python_example_runs(chat_model, capsys):
    examples = python_examples()
    assert len(examples) >= 3 and all(HUB_ID in example or "engine" in example for example in examples)
    scope: dict = {}
    for example in examples:  # one session, in order: later examples use the engine of earlier ones
        exec(compile(example.replace(HUB_ID, str(chat_model)), str(README), "exec"), scope)
    printed = capsys.readouterr().out
    assert "generated: " in printed and "every expert resident" in printed
    assert isinstance(scope["engine"], __import__("localmoe").Engine)
