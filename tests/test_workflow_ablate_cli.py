"""``python -m curry_train ablate``: arms from ``--arm NAME=OVERRIDES``, Markdown or JSON on stdout, bad input is
one line."""

import json

import pytest

from curry_train.__main__ import main
from curry_train.workflow.ablate_cli import parse_arm

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=4",
        "train.warmup_steps=1", "data.max_bytes=100000"]


def test_arm_syntax():
    assert parse_arm("base=") == ("base", [])
    assert parse_arm("wide=model.n_embd=64, model.n_head=4") == ("wide", ["model.n_embd=64", "model.n_head=4"])
    assert parse_arm("pp=parallel.layers_per_stage=[1,1],train.lr=1e-3") == (
        "pp", ["parallel.layers_per_stage=[1,1]", "train.lr=1e-3"])


@pytest.mark.parametrize("argv,message", [
    (["--arm", "wide", "--arm", "b="], "error: --arm 'wide' must be NAME=KEY=VALUE,KEY=VALUE"),
    (["--arm", "a=", "--arm", "model.n_embd=64"], "'64' is not an override KEY=VALUE"),
    (["--arm", "a="], "error: --arm: give at least 2 arms with distinct names"),
    (["--arm", "a=", "--arm", "a=train.lr=1e-3"], "error: --arm: give at least 2 arms with distinct names"),
    (["--arm", "a=", "--arm", "b=seed=4"], "'seed=4' is set by ablate"),
    (["--arm", "a=", "--arm", "b=", "--metric", "accuracy"], "error: metric must be one of final_loss, val_loss"),
    (["--arm", "a=", "--arm", "b=", "--seeds", "1"], "error: seeds must be an integer >= 2"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["ablate", *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.timeout(300)
def test_two_arms_two_seeds_markdown_and_json(capsys):
    arms = ["--arm", "base=", "--arm", "hot=train.lr=3e-2", "--seeds", "2", "--steps", "3"]
    assert main(["ablate", *arms, "--json", *TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in out["arms"]] == ["base", "hot"] and out["seeds"] == [0, 1] and out["steps"] == 3
    base, hot = out["arms"]
    assert hot["overrides"] == ["train.lr=3e-2"] and len(base["values"]) == len(hot["values"]) == 2
    assert base["verdict"] == "baseline" and hot["verdict"] in ("yes", "no", "inconclusive")
    assert hot["test"]["p"] is not None and len(hot["test"]["ci"]) == 2
    assert main(["ablate", *arms, "--metric", "min_loss", *TINY]) == 0
    text = capsys.readouterr().out
    assert "| arm |" in text and "| hot | train.lr=3e-2 |" in text and "min_loss mean" in text
    assert "ablate: hot seed 1: min_loss" in text  # one progress line per run


def test_a_bad_key_in_a_later_arm_is_found_before_any_run(capsys, monkeypatch):
    import importlib

    ablate = importlib.import_module("curry_train.workflow.ablate")

    monkeypatch.setattr(ablate, "train_run", lambda *a, **k: pytest.fail("an arm ran before every arm was checked"))
    assert main(["ablate", "--arm", "a=", "--arm", "b=train.lr=-1", "--steps", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: arm 'b': train.lr must be") and err.count("\n") == 1, err
