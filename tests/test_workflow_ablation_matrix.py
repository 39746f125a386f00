"""Ablation matrix (``curry_train.workflow.ablation_matrix``): leave-one-out and additive effects with Welch verdicts,
inputs from values, ``ablate`` results and metrics JSON-lines files, Markdown and a heatmap PNG, one-line errors."""

import json

import pytest

from curry_train.workflow.ablate import AblationResult, ArmResult, welch_t_test
from curry_train.workflow.ablation_matrix import additive, leave_one_out, read_metrics, values_of

# full variant V = base + a + b + c; a helps a lot, b does nothing, c is too noisy to tell
RESULTS = {
    "V": [3.00, 3.01, 2.99, 3.00],
    "V-a": [3.30, 3.31, 3.29, 3.30],
    "V-b": [3.000, 3.002, 2.998, 3.001],
    "V-c": [2.9, 3.3, 2.8, 3.2],
    "V-bad": [2.70, 2.71, 2.69, 2.70],
}


def test_leave_one_out_verdicts():
    m = leave_one_out(RESULTS, "V", {"a": "V-a", "b": "V-b", "c": "V-c", "bad": "V-bad"})
    verdicts = {c.change: c.verdict for c in m.cells}
    assert verdicts == {"a": "helps", "b": "no effect", "c": "inconclusive", "bad": "hurts"}
    a = m.cells[0]
    assert a.effect == pytest.approx(0.30) and a.n == (4, 4)
    assert a.test.diff == pytest.approx(welch_t_test(RESULTS["V-a"], RESULTS["V"]).diff)
    assert m.min_effect == pytest.approx(0.03)  # 1% of the full variant's mean


def test_additive_effects_follow_the_order():
    results = {"base": [4.0, 4.02, 3.98], "+a": [3.5, 3.52, 3.48], "+a+b": [3.5, 3.51, 3.49]}
    m = additive(results, ["base", "+a", "+a+b"], changes=["a", "b"], min_effect=0.05)
    assert [c.change for c in m.cells] == ["a", "b"]
    assert m.cells[0].effect == pytest.approx(0.5) and m.cells[0].verdict == "helps"
    assert m.cells[0].arm == "+a" and m.cells[0].reference == "base"
    assert m.cells[1].verdict == "no effect"


def test_inputs_from_ablate_result_and_metrics_files(tmp_path):
    arms = [ArmResult("V", [], [3.0, 3.01, 2.99]), ArmResult("V-a", ["x=1"], [3.3, 3.31, 3.29])]
    res = AblationResult(arms, "final_loss", [0, 1, 2], 10, 0.05, 0.03)
    assert values_of(res) == {"V": [3.0, 3.01, 2.99], "V-a": [3.3, 3.31, 3.29]}
    assert leave_one_out(res, "V", {"a": "V-a"}).cells[0].verdict == "helps"
    files = {}
    for arm, vals in RESULTS.items():
        files[arm] = []
        for s, v in enumerate(vals):
            p = tmp_path / f"{arm}-{s}.jsonl"
            p.write_text("\n".join(json.dumps({"step": i, "loss": v + 1.0 / (i + 1) - 0.1}) for i in range(10)) + "\n")
            files[arm].append(str(p))
    assert read_metrics(files["V"][0], "loss", tail=1) == pytest.approx(3.0)
    m = leave_one_out(files, "V", {"a": "V-a", "b": "V-b"}, metric="loss", tail=1)
    assert [c.verdict for c in m.cells] == ["helps", "no effect"]


def test_markdown_and_heatmap(tmp_path):
    m = leave_one_out(RESULTS, "V", {"a": "V-a", "b": "V-b", "c": "V-c"})
    md = m.markdown()
    assert md.startswith("leave-one-out ablation of loss") and "| a | V-a vs V |" in md
    assert md.count("\n| ") == 4 and "inconclusive" in md
    png = m.heatmap(tmp_path / "matrix.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("call,match", [
    (lambda: leave_one_out({"V": [1.0], "V-a": [1.1, 1.2]}, "V", {"a": "V-a"}), "at least 2"),
    (lambda: leave_one_out(RESULTS, "W", {"a": "V-a"}), "full variant 'W'"),
    (lambda: leave_one_out(RESULTS, "V", {"a": "V-z"}), "no results for arm 'V-z'"),
    (lambda: leave_one_out(RESULTS, "V", {}), "without must be"),
    (lambda: leave_one_out({"V": [1.0, float("nan")]}, "V", {"a": "V"}), "finite number"),
    (lambda: leave_one_out(RESULTS, "V", {"a": "V-a"}, alpha=2), "alpha"),
    (lambda: leave_one_out(RESULTS, "V", {"a": "V-a"}, min_effect=-1), "min_effect"),
    (lambda: additive(RESULTS, ["V"]), "order must list"),
    (lambda: additive(RESULTS, ["V", "V-a"], changes=["a", "b"]), "changes must name"),
    (lambda: values_of([1, 2]), "results must be"),
    (lambda: read_metrics("/nonexistent/m.jsonl"), "does not exist"),
])
def test_bad_arguments_are_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
