"""``wsm_optim.common.text``: the indefinite article in messages ("an OrderedDict", never "a OrderedDict")."""

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from wsm_optim.common.text import a, article


@pytest.mark.parametrize("value, expected", [
    (OrderedDict(), "an OrderedDict"), ({}, "a dict"), (3, "an int"), (2.5, "a float"), ("s", "a str"),
    (None, "a NoneType"), ([], "a list"), ((), "a tuple"), (b"", "a bytes"), (object(), "an object"),
    (torch.zeros(1), "a Tensor"), (torch.nn.Linear(1, 1), "a Linear"), (torch.float16, "a dtype"),
    (torch.zeros(1).untyped_storage(), "an UntypedStorage"), (torch.nn.MSELoss(), "an MSELoss"),
    (torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), "an SGD"),
    (torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), "an AdamW"),
])
def test_type_names_of_values_read_correctly(value, expected):
    assert a(type(value).__name__) == expected


@pytest.mark.parametrize("noun, expected", [
    ("uint8", "a"), ("int8", "an"), ("user", "a"), ("umbrella", "an"), ("one-off", "a"), ("hour", "an"),
    ("ndarray", "an"), ("NDArray", "an"), ("DTensor", "a"), ("FSDP", "an"), ("HF", "an"), ("URL", "a"),
    ("'OrderedDict'", "an"), ("`int`", "an"), ("8-bit", "an"), ("11", "an"), ("18", "an"), ("1-sqrt", "a"),
    ("110", "a"), ("80", "an"), ("torch.sparse_coo", "a"), ("Example", "an"), ("European", "a"),
])
def test_article_by_sound(noun, expected):
    assert article(noun) == expected
    assert a(noun) == f"{expected} {noun}"


def test_bad_nouns_name_the_argument():
    with pytest.raises(ValueError, match=r"article: noun must contain a letter or digit, got '  '"):
        a("  ")
    with pytest.raises(TypeError, match="article: noun must be a str, got int"):
        a(3)


def test_importable_without_torch():
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "from wsm_optim.common.text import a; print(a('OrderedDict'))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "an OrderedDict"
