"""GPipe with every receive posted one micro-batch ahead (used by ``PipelineSchedule(kind="gpipe")``).

PyTorch's ``ScheduleGPipe`` posts the receive for micro-batch ``i`` right before it computes ``i``. gloo moves
a message only once its receive is posted, so on CPU the sender is already computing ``i + 1`` when the data
finally goes, and the receiver waits: the measured idle fraction sits above the simulator's. Posting the
receive for ``i + 1`` before computing ``i`` lets the transfer overlap compute and closes most of that gap.
``python -m curry_train bench pipeline`` measures both, as rows ``gpipe-torch`` (PyTorch's order) and ``gpipe``.
"""

from __future__ import annotations

from torch.distributed.pipelining import ScheduleGPipe
from torch.distributed.pipelining import schedules as _schedules


class ScheduleGPipeEarlyRecv(ScheduleGPipe):
    """``ScheduleGPipe`` that posts each receive one micro-batch early: the activation for forward ``i + 1`` (and
    the gradient for backward ``i + 1``) is received while forward (backward) ``i`` computes. Only the order in
    which receives are *posted* changes; at most one receive per direction is outstanding, so messages match as
    before. Overrides ``_step_microbatches`` of PyTorch 2.13 and uses its stage API and p2p helpers."""

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None,
                           return_outputs: bool = True, loss_kwargs=None):
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        stage, m = self._stage, self._n_microbatches
        first_target = target_mbs[0] if target_mbs is not None else None
        self._initialize_stage(arg_mbs[0], kwarg_mbs[0], first_target, loss_kwargs)

        def run_phase(phase, recv_ops, compute, send_ops):
            """Compute micro-batches 0..m-1 in order, each one's receive posted while the previous one computes."""
            sends, recv = [], _schedules._sorted_batch_p2p(recv_ops(0), desc=f"{phase}_recv")
            for i in range(m):
                for work in recv.values():
                    _schedules._wait_batch_p2p(work)
                if i + 1 < m:
                    recv = _schedules._sorted_batch_p2p(recv_ops(i + 1), desc=f"{phase}_recv")
                compute(i)
                sends += _schedules._sorted_batch_p2p(send_ops(i), desc=f"{phase}_send").values()
            for work in sends:
                _schedules._wait_batch_p2p(work)

        def forward(i):  # the loss (last stage only, which sends nothing forward) right after its forward
            output = stage.forward_one_chunk(i, arg_mbs[i], kwarg_mbs[i], save_forward_output=return_outputs)
            self._maybe_compute_loss(stage, output, target_mbs, i, loss_kwargs)

        def backward(i):
            stage.backward_one_chunk(i, loss=self._maybe_get_loss(stage, i), last_backward=i == m - 1)

        run_phase("fwd", stage.get_fwd_recv_ops, forward, stage.get_fwd_send_ops)
        run_phase("bwd", stage.get_bwd_recv_ops, backward, stage.get_bwd_send_ops)
        self._update_losses(stage, losses)
        stage.perform_reduce_grad(m if self.scale_grads else 1)


def missing_torch_internals() -> list[str]:
    """The private PyTorch names ``ScheduleGPipeEarlyRecv`` relies on that this torch lacks (written against 2.13);
    ``PipelineSchedule`` falls back to ``ScheduleGPipe`` with a warning when any is missing."""
    needed = [(ScheduleGPipe, n) for n in ("_check_inputs", "_initialize_stage", "_maybe_compute_loss",
                                           "_maybe_get_loss", "_update_losses")]
    needed += [(_schedules, n) for n in ("_sorted_batch_p2p", "_wait_batch_p2p")]
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
