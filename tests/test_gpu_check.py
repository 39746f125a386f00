"""``python -m curry_train gpu-check``: without CUDA one skipped line (exit 0); the runner gives every check its own
process and share of the budget, and a check that raises, exits or hangs is one line while the others report;
``--force-cpu`` runs every real check's code on CPU (slow)."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from curry_train.__main__ import main
from curry_train.bench.gpu_check import CHECKS, RESERVE_S, render, run_checks

TESTS = str(Path(__file__).parent)
CTX = {"device": "cpu", "ranks": 2, "backend": "gloo", "standin": True}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the checks run (make gpu-check)")
def test_without_cuda_it_writes_one_skipped_line_and_exits_0(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("gpu-check: skipped, torch.cuda.is_available() is False") and "\n" not in line
    assert (tmp_path / "gpu-check.md").read_text() == line + "\n"
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["skipped"] == "torch.cuda.is_available() is False" and data["environment"]["torch"] == torch.__version__
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "gpu-check-logs").exists()


def _dead(pid: int, wait_s: float = 10.0) -> bool:
    """Gone or a zombie (killed, not yet reaped by whoever inherited it) within ``wait_s``."""
    if not os.path.isdir("/proc"):  # no process table to read states from (macOS): signal 0 finds zombies too
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_check_that_raises_exits_or_hangs_is_one_line_and_the_others_still_report(tmp_path):
    pid_file = tmp_path / "hang.pid"
    checks = [(name, f"gpu_check_targets:{fn}", 1, f"what {name} runs") for name, fn in
              [("first", "works"), ("raises", "raises"), ("skips", "skips"), ("exits", "exits"), ("hangs", "hangs"),
               ("last", "works")]]
    env = dict(os.environ, PYTHONPATH=TESTS)
    budget = RESERVE_S + 18
    t0 = time.perf_counter()
    results = run_checks(checks, {**CTX, "pid_file": str(pid_file)}, budget, tmp_path / "logs", env)
    assert time.perf_counter() - t0 < budget
    by = {r["name"]: r for r in results}
    assert [r["name"] for r in results] == [c[0] for c in checks]
    assert by["first"]["status"] == by["last"]["status"] == "ok"
    row = by["first"]["rows"][0]
    assert row["ranks"] == 2 and row["timeout_s"] == by["first"]["timeout_s"] == pytest.approx(18 / 6)
    assert by["last"]["timeout_s"] > 18 / 6  # what the fast checks left over flowed to the later ones
    assert by["raises"] | {"seconds": 0} == {"name": "raises", "seconds": 0, "timeout_s": by["raises"]["timeout_s"],
                                              "status": "failed", "reason": "ValueError: boom ... the root cause"}
    assert by["skips"]["status"] == "skipped" and by["skips"]["reason"] == "nothing to run here"
    assert by["exits"]["status"] == "failed" and by["exits"]["reason"].startswith("exited with code 3 without a result")
    hang = by["hangs"]
    assert hang["status"] == "timed out" and hang["reason"] == f"timed out after {hang['timeout_s']:.0f} s (its " \
                                                              "processes killed)"
    assert hang["seconds"] == pytest.approx(hang["timeout_s"], abs=2)
    assert _dead(int(pid_file.read_text())), "the hung check's own child was killed with it"

    text = render(results, CTX | {"ranks": 2}, {"torch": torch.__version__, "cuda": None}, budget, 12.0, checks)
    assert text.startswith("# gpu-check\n\nCPU stand-in (--force-cpu), not GPU numbers: 2 gloo ranks on CPU")
    assert f"6 checks in 12.0 s of a {budget:.0f} s budget: 2 ok, 1 skipped, 2 failed, 1 timed out" in text
    for line in ("## raises: failed", "failed: ValueError: boom ... the root cause", "## hangs: timed out",
                 "## skips: skipped", "skipped: nothing to run here", "what last runs", "| ranks | timeout_s | pid |",
                 f"| 2 | {row['timeout_s']:.4g} | {row['pid']} |", "- a note", "- skipped a part: not on this device"):
        assert line in text, line

    spent = run_checks(checks[:2], CTX, RESERVE_S + 0.5, tmp_path / "logs", env)
    assert [r["status"] for r in spent] == ["timed out"] * 2
    assert spent[0]["reason"] == f"not run: 0 s of the {RESERVE_S + 0.5:.0f} s budget left"


def test_bad_budget_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["gpu-check", "--budget-s", "0"])
    assert e.value.code == 2 and "--budget-s must be > 0 seconds, got 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_force_cpu_runs_every_check_on_cpu_and_reports_its_numbers(tmp_path, capsys):
    """CPU stands in for the GPU: 2 gloo ranks, tiny settings; PyTorch's CP path and the CUDA peak are skipped."""
    assert main(["gpu-check", "--force-cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-check.md").read_text()
    assert text in capsys.readouterr().out and "CPU stand-in (--force-cpu), not GPU numbers" in text
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == [c[0] for c in CHECKS] and all(c["status"] == "ok" for c in checks.values()), text
    assert all(c["seconds"] <= c["timeout_s"] for c in checks.values()) and data["seconds"] <= data["budget_s"] == 480
    (train,) = checks["nccl-train"]["rows"]
    assert train["backend"] == "gloo" and train["ranks stopped by SIGTERM on rank 0"] == 2
    assert train["resumed at step"] == "3" and train["resumed vs straight max rel err"] <= 1e-6
    sides = {r["side"]: r for r in checks["fsdp2-vs-ddp"]["rows"]}
    assert set(sides) == {"DDP fp32", "DDP bf16", "FSDP2 full fp32", "FSDP2 full bf16"}
    assert all(sides[s]["total / (DDP/N)"] == pytest.approx(1, rel=0.01) for s in ("FSDP2 full fp32", "FSDP2 full bf16"))
    assert sides["DDP fp32"]["vs DDP fp32"] == 1 and all(r["step ms"] > 0 for r in sides.values())
    assert all(0 < r["MFU % (bf16 peak)"] < 100 for r in checks["mfu"]["rows"])
    assert "bf16" in checks["mfu"]["notes"][1]
    cp = {r["attention"]: r for r in checks["cp"]["rows"]}
    assert set(cp) == {"one process (SDPA)", "ring (curry_train)"} and cp["ring (curry_train)"]["loss rel err"] < 1e-5
    assert checks["cp"]["skipped"]["torch (PyTorch CP)"].startswith("PyTorch's CP path needs CUDA")
    modes = {r["mode"]: r for r in checks["recompute-memory"]["rows"]}
    assert modes["full"]["activations MiB"] < modes["selective"]["activations MiB"] < modes["none"]["activations MiB"]
    (compose,) = checks["compose-memory"]["rows"]
    assert compose["state / plan"] == pytest.approx(1, rel=0.01) and compose["loss last"] < compose["loss first"]
    assert compose["CUDA peak MiB (max_memory_allocated, largest rank)"] is None
    assert "CUDA peak" in checks["compose-memory"]["skipped"]
    assert sorted(p.name for p in (tmp_path / "gpu-check-logs").glob("*.log")) == sorted(f"{c[0]}.log" for c in CHECKS)
