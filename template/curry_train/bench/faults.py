"""``python -m curry_train bench faults``: damage checkpoints and poison steps on purpose, and report what happens.

Not a timing: the table of guarantees the dcp and checkpoint-cadence skill pages state, produced on this machine
and this model. One clean run of ``steps`` optimizer steps saves every ``every`` steps (``Checkpointer``); then, per
case, a copy of its checkpoint folder is damaged, a fresh model + AdamW + schedule loads it
(``Checkpointer.load``: the newest checkpoint that verifies, damaged ones named in a warning) and trains to the
end. "same final loss" compares that run's last loss with the clean run's: equal (to the bit) when the resume
rolled back to an intact checkpoint and replayed the same steps. The non-finite cases poison the loss of chosen
steps (``run_training_steps``' guard skips their update; ``Checkpointer.save`` never writes a NaN/Inf state).
The trust cases replace a file of the newest checkpoint with a pickle that would create a file when unpickled (and
rewrite ``integrity.json`` to match, as anyone who can write the folder can): "nothing ran" means that file does
not exist after the resume. A second owner, a full disk: ``_trust_rows``.
"""

from __future__ import annotations

import errno
import math
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..data import build_batches, seed_everything
from ..loop import NonFiniteTrainingError, build_optimizer, build_scheduler, run_training_steps
from ..primitives.checkpoint import Checkpointer, CheckpointWarning, NonFiniteStateError, step_dirname
from ..primitives.checkpoint_files import INTEGRITY, write_description
from ..primitives.checkpoint_trust import CheckpointDiskFullError, DirectoryInUseError, temp_name, temp_run
from ..primitives.grad_accum import GradientAccumulation
from ..primitives.model_io import forward_loss_sum
from ..user_model import build_model
from .common import user_loss


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid, n = len(data) // 2, min(4000, len(data) // 4)
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


class _Payload:
    """Unpickled, it creates the file ``ran`` (what a tampered checkpoint file would do with ``os.system``)."""

    def __init__(self, ran: Path):
        self.ran = str(ran)

    def __reduce__(self):
        return open, (self.ran, "w")


def _tamper(path: Path) -> None:
    """Replace ``path`` with a pickle that runs code, and re-record the folder so it still verifies."""
    ran = path.parent.parent / "payload-ran"
    if path.suffix == ".pt":
        torch.save(_Payload(ran), path)
    else:
        path.write_bytes(pickle.dumps(_Payload(ran)))
    (path.parent / INTEGRITY).unlink()
    write_description(path.parent)


def _leftovers(case_dir: Path) -> None:
    """A killed run's marked temporaries, and the user's own ``.tmp-*`` file and folder (never ours to delete)."""
    (case_dir / temp_name("dead42", "latest")).write_text("x")
    (case_dir / temp_name("dead42", "step-00099999")).mkdir()
    (case_dir / ".tmp-mydata").mkdir()
    (case_dir / ".tmp-mydata" / "important.txt").write_text("the user's")
    (case_dir / "latest.tmp-notes").write_text("the user's")


# name -> (what is damaged, how): applied to the newest checkpoint (or to every one for "everything damaged")
DAMAGE = {
    "truncated shard": (_shard, _truncate),
    "4000 flipped bytes in a shard": (_shard, _flip),
    "garbage .metadata": (lambda d: d / ".metadata", lambda p: p.write_bytes(b"\x00garbage" * 16)),
    "missing .metadata": (lambda d: d / ".metadata", Path.unlink),
    "missing meta.json": (lambda d: d / "meta.json", Path.unlink),
    "garbage meta.json": (lambda d: d / "meta.json", lambda p: p.write_text("{not json")),
    "stale latest pointer": (lambda d: d.parent / "latest", lambda p: p.write_text("step-00099999\n")),
    "leftover temporaries of a killed save": (lambda d: d.parent, _leftovers),
    "integrity.json deleted": (lambda d: d / INTEGRITY, Path.unlink),
    "a file integrity.json does not list": (lambda d: d / "notes.txt", lambda p: p.write_text("?")),
    "code-running pickle as scheduler.pt": (lambda d: d / "scheduler.pt", _tamper),
    "code-running pickle as rng-rank0.pt": (lambda d: d / "rng-rank0.pt", _tamper),
    "code-running pickle as .metadata": (lambda d: d / ".metadata", _tamper),
    "everything damaged": (None, None),
}


class _Run:
    """A model, its optimizer and schedule, and the batches: built the same way for every case."""

    def __init__(self, cfg, steps: int):
        seed_everything(cfg.seed)
        self.model = build_model(cfg)
        t = cfg.train
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, (t.beta1, t.beta2))
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, steps, t.min_lr_ratio)
        self.batches, self.steps, self.cfg = build_batches(cfg), steps, cfg

    def train(self, start: int, ckpt: Checkpointer | None, every: int, loss_fn=None, patience: int = 3,
              save_last: bool = True) -> list[dict]:
        def on_step(step, metrics):
            done = step + 1
            if ckpt is not None and (done % every == 0 or (save_last and done == self.steps)) and not metrics["skipped"]:
                ckpt.save(step + 1, self.model, self.optimizer, self.scheduler)

        return run_training_steps(self.model, self.optimizer, self.scheduler, self.batches,
                                  GradientAccumulation(1), self.steps, start_step=start, grad_clip=self.cfg.train.grad_clip,
                                  log_every=0, progress=False, loss_fn=loss_fn, on_step=on_step,
                                  nonfinite_patience=patience)


def _poisoned(base, bad_steps: set[int], counter: list[int]):
    """``loss_fn`` whose loss (hence gradient) is NaN on the optimizer steps in ``bad_steps``."""
    def loss_fn(model, batch):
        step = counter[0]
        counter[0] += 1
        loss_sum, n = (base or forward_loss_sum)(model, batch)
        return (loss_sum * float("nan"), n) if step in bad_steps else (loss_sum, n)
    return loss_fn


def bench_faults(cfg, steps: int = 12, every: int = 5, threads: int | None = 1, cases: tuple | None = None) -> dict:
    """Run every fault case; returns ``{"rows": [...], "clean_final_loss": ...}``. ``threads``: torch's intra-op
    threads while it runs (None: unchanged). Not a timing, so one thread: the clean run and every resume run alike
    (the bitwise comparison holds at any count), and the tiny model's many small ops never wait for a second thread
    that a busy machine has descheduled (on 2 cores with other jobs, 2 threads made this bench 5-10x slower).
    ``cases``: only these ``DAMAGE`` cases (``--quick``; the non-finite and ownership rows always run)."""
    unknown = sorted(set(cases or ()) - set(DAMAGE))
    if unknown:
        raise ValueError(f"bench faults: no damage case {unknown}; cases: {sorted(DAMAGE)}")
    if steps <= 2 * every:
        raise ValueError(f"bench faults needs steps > 2 * every (two checkpoints and steps after them), got "
                         f"steps={steps}, every={every}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_faults(cfg, steps, every, cases)
    finally:
        torch.set_num_threads(previous)


def _bench_faults(cfg, steps: int, every: int, cases: tuple | None = None) -> dict:
    loss_fn = user_loss(cfg)
    work = Path(tempfile.mkdtemp(prefix="curry-faults-"))
    rows = []
    try:
        clean_dir = work / "clean"
        clean = _Run(cfg, steps).train(0, Checkpointer(clean_dir, keep_last=0), every, loss_fn, save_last=False)
        final = clean[-1]["loss"]
        newest = clean_dir / step_dirname(steps - steps % every)
        if cases is not None:
            print(f"reduced run (--quick): {len(cases)} of {len(DAMAGE)} damage cases; `bench faults` without --quick "
                  "runs every one")
        for case, (target, damage) in DAMAGE.items():
            if cases is not None and case not in cases:
                continue
            case_dir = work / case.replace(" ", "-")
            shutil.copytree(clean_dir, case_dir)
            step_dir = case_dir / newest.name
            if target is None:
                for d in case_dir.glob("step-*"):
                    _truncate(_shard(d))
            else:
                damage(target(step_dir))
            rows.append(_resume_row(cfg, case, case_dir, steps, every, loss_fn, final))
        rows += _nonfinite_rows(cfg, work, steps, every, loss_fn)
        rows += _trust_rows(cfg, work, clean_dir, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(rows, final)
    return {"rows": rows, "clean_final_loss": final, "steps": steps, "every": every}


def _resume_row(cfg, case: str, case_dir: Path, steps: int, every: int, loss_fn, clean_final: float) -> dict:
    run = _Run(cfg, steps)
    ckpt = Checkpointer(case_dir, keep_last=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        try:
            meta = ckpt.load(run.model, run.optimizer, run.scheduler)
        except ValueError as e:
            said = str(e).replace(f" in {case_dir}", "")
            return {"case": case, "outcome": f"error, exit 2: {said[:150]}", "warning": "",
                    "same_final_loss": None}
    said = next((str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)), "")
    start = meta["step"] if meta else 0
    history = run.train(start, ckpt, every, loss_fn)
    ckpt.close()
    leftovers = sorted(p.name for p in case_dir.iterdir() if temp_run(p.name) is not None)
    outcome = f"resumed from step {start}" + (f"; leftovers {leftovers}" if leftovers else "; no leftovers")
    if (case_dir / ".tmp-mydata").exists():
        kept = (case_dir / ".tmp-mydata" / "important.txt").exists() and (case_dir / "latest.tmp-notes").exists()
        outcome += "; user's .tmp-* kept" if kept else "; user's .tmp-* DELETED"
    if "pickle" in case:
        outcome += "; payload RAN" if (case_dir / "payload-ran").exists() else "; nothing ran"
    return {"case": case, "outcome": outcome, "warning": said.split(str(case_dir) + "/")[-1][:110],
            "same_final_loss": history[-1]["loss"] == clean_final, "integrity_file": INTEGRITY}


def _nonfinite_rows(cfg, work: Path, steps: int, every: int, loss_fn) -> list[dict]:
    rows = []
    for case, bad, patience in ((f"NaN loss at steps {every}, {every + 1} (patience 3)", {every, every + 1}, 3),
                                (f"NaN loss from step {every + 1} on (patience 3)", set(range(every + 1, steps)), 3)):
        run, ckpt_dir = _Run(cfg, steps), work / f"nan-{len(bad)}"
        ckpt = Checkpointer(ckpt_dir, keep_last=2)
        counter = [0]
        try:
            history = run.train(0, ckpt, 1, _poisoned(loss_fn, bad, counter), patience)
            skipped = [m["step"] for m in history if m["skipped"]]
            outcome = f"completed; skipped steps {skipped}"
        except NonFiniteTrainingError as e:
            outcome = f"stopped, exit 1: {str(e).split(':')[0]}"
        finite = all(math.isfinite(float(p.detach().float().abs().sum())) for p in run.model.parameters())
        rows.append({"case": case, "outcome": outcome,
                     "warning": f"checkpoints kept: {ckpt.steps()}; parameters finite: {finite}",
                     "same_final_loss": None})
    model = build_model(cfg)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    try:
        Checkpointer(work / "nan-state").save(1, model)
        outcome = "saved (a bug)"
    except NonFiniteStateError as e:
        outcome = f"refused: {str(e).split('. ')[0]}"
    rows.append({"case": "save a NaN parameter", "outcome": outcome[:110],
                 "warning": f"files written: {len(list((work / 'nan-state').glob('step-*')))}", "same_final_loss": None})
    return rows


def _trust_rows(cfg, work: Path, clean_dir: Path, steps: int) -> list[dict]:
    """A second owner of a folder in use, and a save that hits a full disk (``OSError(ENOSPC)`` injected into DCP's
    write of the data files, after they are partly written)."""
    import fcntl
    import json
    import os

    from torch.distributed.checkpoint import FileSystemWriter

    from ..primitives.checkpoint_trust import LOCK_NAME

    rows = []
    busy = work / "busy"
    shutil.copytree(clean_dir, busy)
    with open(busy / LOCK_NAME, "a+") as other:  # another open file: to flock, that is another owner
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write(json.dumps({"pid": 4242, "host": "node-7", "since": 0}))
        other.flush()
        try:
            Checkpointer(busy).acquire()
            outcome = "accepted (a bug)"
        except DirectoryInUseError as e:
            outcome = "refused: " + str(e).replace(str(busy), "DIR").split(" since ")[0]
    rows.append({"case": "second run on a folder in use", "outcome": outcome[:110], "warning": "",
                 "same_final_loss": None})

    full = work / "full"
    shutil.copytree(clean_dir, full)
    run = _Run(cfg, steps)
    ckpt = Checkpointer(full, keep_last=0)
    ckpt.load(run.model, run.optimizer, run.scheduler)
    original = FileSystemWriter.write_data

    def write_then_fill(self, plan, planner):
        original(self, plan, planner).wait()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    FileSystemWriter.write_data = write_then_fill
    try:
        ckpt.save(steps, run.model, run.optimizer, run.scheduler)
        outcome = "saved (a bug)"
    except CheckpointDiskFullError as e:
        outcome = "stopped: " + str(e).split(";")[0].replace(str(full), "DIR")
    finally:
        FileSystemWriter.write_data = original
        ckpt.close()
    partial = [p.name for p in full.iterdir() if temp_run(p.name) is not None]
    rows.append({"case": "disk full while saving", "outcome": outcome[:110],
                 "warning": f"partial left: {partial or 'none'}; checkpoints kept: {ckpt.steps()}",
                 "same_final_loss": None})
    return rows


def _print(rows: list[dict], final: float) -> None:
    print(f"clean run final loss {final:.6f}; each damaged copy is loaded by a fresh model and trained to the end")
    print("| case | what happened | warning / state | same final loss |")
    print("|---|---|---|---|")
    for r in rows:
        same = {True: "yes (bitwise)", False: "NO", None: "-"}[r["same_final_loss"]]
        print(f"| {r['case']} | {r['outcome']} | {r['warning']} | {same} |")
