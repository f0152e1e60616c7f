r"""The per-sample statistics a :class:`csl_fast.CSLTracker` derives from its buffers: the
loss histories, CSL and its means (per label too), area under the margin, data-map
confidence and variability, gradient norms, suggested labels and learning times. Each is
computed on the tracker's device without a host sync; :class:`TrackerStatistics` is the
mix-in that gives them to :class:`csl_fast.CSLTracker`, whose buffers they read by name.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["MIN_SUGGESTION_SHARE_OF", "TrackerStatistics"]

#: The least number of presentations a suggestion's confidence is a share of
#: (:meth:`TrackerStatistics.suggestions`): one vote is at most 1/3, two at most 2/3.
MIN_SUGGESTION_SHARE_OF = 3


class TrackerStatistics:
    """The statistics of :class:`csl_fast.CSLTracker`, a mix-in: the tracker supplies the
    buffers (read as attributes through its ``__getattr__``), ``dtype``, ``device``,
    ``epoch`` and the histories."""

    @property
    def loss_history(self) -> torch.Tensor:
        """float16 ``[epochs, N]``: mean training loss per epoch (NaN: not presented).
        Needs ``history=True``."""
        return self._stack("loss_history", torch.float16)

    @property
    def eval_loss_history(self) -> torch.Tensor:
        """float16 ``[passes, N]``: mean eval-pass loss per pass. Needs ``history=True``."""
        return self._stack("eval_loss_history", torch.float16)

    @property
    def input_grad_history(self) -> torch.Tensor:
        r"""float32 ``[E', N]``: per-epoch mean :math:`\|\partial\ell_i/\partial x_i\|^2`
        (NaN: no record that epoch); row ``k`` is epoch ``input_grad_first_epoch + k``."""
        return self._stack("input_grad_history", torch.float32)

    def _stack(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        rows = self._histories[name]
        if not rows:
            return torch.empty(0, self.num_samples, dtype=dtype, device=self.device)
        return torch.stack(rows)

    @property
    def csl(self) -> torch.Tensor:
        """In-training CSL (``csl_sum``)."""
        return self.csl_sum

    @property
    def csl_mean(self) -> torch.Tensor:
        """Mean in-training loss per presentation (NaN: never presented)."""
        return _mean_or_nan(self.csl_sum, self.csl_count)

    @property
    def label_csl_mean(self) -> torch.Tensor | None:
        """``[N, L]`` mean per-entry loss per presentation (``label_csl / csl_count``, NaN:
        never presented), or ``None`` without ``num_labels``."""
        if self.label_csl is None:
            return None
        return _mean_or_nan(self.label_csl, self.csl_count[:, None])

    @property
    def eval_csl(self) -> torch.Tensor:
        """Eval-pass CSL (``eval_csl_sum``): the authors' released code's CSL."""
        return self.eval_csl_sum

    @property
    def eval_csl_mean(self) -> torch.Tensor:
        """Mean eval-pass loss (NaN: never scored)."""
        return _mean_or_nan(self.eval_csl_sum, self.eval_count)

    @property
    def aum(self) -> torch.Tensor:
        """Area under the margin: mean over presentations of
        :math:`\\min(z_y - \\max_{j\\ne y} z_j,\\ 1000)` (NaN: never presented). The cap
        (:data:`csl_fast.stats.MARGIN_CAP`) keeps a presentation whose label held the only
        finite logit (a masked class set: margin +inf) from making the mean infinite."""
        return _mean_or_nan(self.margin_sum, self.csl_count)

    @property
    def confidence(self) -> torch.Tensor:
        """Data-map confidence: mean of :math:`p_y` over presentations."""
        return _mean_or_nan(self.p_true_sum, self.csl_count)

    @property
    def variability(self) -> torch.Tensor:
        r"""Data-map variability: population std of :math:`p_y` over presentations.

        Formed from running sums as :math:`\sqrt{E[p^2] - E[p]^2}`: in a float32 tracker
        the difference loses digits over thousands of presentations (a constant
        :math:`p_y` read as up to ~0.01 after 3,000); a float64 tracker keeps it below
        1e-6.
        """
        mean = self.confidence
        var = _mean_or_nan(self.p_true_sq_sum, self.csl_count) - mean * mean
        return var.clamp(min=0).sqrt()

    @property
    def logit_grad_norm_mean(self) -> torch.Tensor:
        """Mean :math:`\\|\\partial\\ell_i/\\partial z_i\\|^2` over presentations."""
        return _mean_or_nan(self.grad_norm_sum, self.csl_count)

    @property
    def input_grad_sq_mean(self) -> torch.Tensor:
        """Mean :math:`\\|\\partial\\ell_i/\\partial x_i\\|^2` over input-gradient records.

        On a tracker of sequences a sequence's input gradient is that of the sum of its
        positions' losses, which grows with its length: long sequences rank first (the
        detectors warn when lengths differ)."""
        return _mean_or_nan(self.input_grad_sq_sum, self.input_grad_count)

    @property
    def loss_sensitivity(self) -> torch.Tensor:
        """Loss sensitivity after Arpit et al. (2017), the input gradient's norm averaged over
        training: here the Euclidean norm, mean :math:`\\|\\partial\\ell_i/\\partial x_i\\|_2`,
        which the recorded per-sample norms give (Arpit et al. average the l1 norm: the values
        differ, the ranking is the score's use).

        On a tracker of sequences a sequence's input gradient is that of the sum of its
        positions' losses, which grows with its length: long sequences rank first (the
        detectors warn when lengths differ)."""
        return _mean_or_nan(self.input_grad_norm_sum, self.input_grad_count)

    @property
    def ever_correct(self) -> torch.Tensor:
        """bool: classified correctly at some presentation (a sample that was correct and is
        not now has at least one forgetting event)."""
        return self.last_correct | (self.forgetting > 0)

    def suggestions(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Suggested labels: the class each sample should probably have, with a confidence.

        Returns ``(label, confidence)``, both ``[N]`` on the tracker's device: ``label``
        int64, the suggested class, -1 where there is none (never presented, one class, or
        a tracker of sequences: there every sample is -1, also one that a batch of
        one-token sequences, ``[B, V, 1]`` logits, recorded as a classification row before
        the tracker saw a longer one); ``confidence`` of the tracker's dtype, in
        ``[0, 1]``, NaN where there is no suggestion.

        The suggestion is the class the network predicted most often *when it disagreed
        with the given label* :math:`y`: the majority, found by a Boyer-Moore vote in
        presentation order (12 bytes per sample: ``suggest_label``, ``suggest_votes``,
        ``suggest_hits``, int32), of :math:`\arg\max_j z_{t,j}` over the presentations
        :math:`t` at which that argmax is not :math:`y` (there it is the runner-up
        ``Stat.OTHER_ARGMAX``). A flipped sample is misclassified as its true class until
        the network memorises the wrong label; from then on its prediction is the given
        label, which is why the last prediction is the wrong answer to reuse, and those
        presentations do not vote. A sample never misclassified has no suggestion.

        ``confidence`` is the share of the presentations *before the network fitted the
        given label for good* at which it predicted the suggested class:

        .. math::

            c_i = \frac{h_i}{\max(n_i, \; 2 h_i - v_i, \; 3)}, \qquad
            n_i = \begin{cases}
                k_i \, e_i / E & e_i \ge 0 \text{ (fitted at its last presentation)} \\
                k_i & \text{otherwise}
            \end{cases}

        with :math:`h_i` = ``suggest_hits`` (votes for the candidate since it became the
        candidate), :math:`v_i` = ``suggest_votes``, :math:`k_i` = ``csl_count``,
        :math:`e_i` = ``learned_epoch`` (the epoch its final correct streak began in) and
        :math:`E` = :attr:`epoch` (completed epochs; with :math:`E = 0` the tracker has no
        epoch stamps and :math:`n_i = k_i`). :math:`n_i` counts the presentations before
        the final correct streak: :math:`k_i / E` per epoch times the :math:`e_i` epochs
        before the streak began, exact when a sample is presented once per epoch and an
        estimate otherwise.
        :math:`2 h_i - v_i` is the number of votes cast since the candidate took over
        (:math:`h_i` for it, :math:`h_i - v_i` against it), all at presentations before
        the streak, so it is a lower bound of :math:`n_i`; as :math:`v_i \le h_i`, it
        keeps :math:`c_i \le 1` where :math:`n_i` is an estimate. The 3
        (:data:`MIN_SUGGESTION_SHARE_OF`) keeps a vote or two from reading as certainty: a
        clean sample misclassified at its first presentation only, then fitted, had
        :math:`c_i = 1/1` and was relabelled by ``csl_fast.clean`` at full confidence (an
        audit: 15 clean samples of a 2-epoch run moved to a wrong class); one vote now gives
        at most 1/3, below the default ``min_confidence`` 0.4 (dropped, the safe side), two
        at most 2/3. When the candidate
        changed during training, the predictions of the class from before it took over
        are not kept (12 bytes do not hold them): :math:`c_i` is then a lower bound of the
        share (an audit's digits run: 4 of 5 drops were flips whose suggestion was their
        true class at a share of 0.45-0.55, read as 0.1-0.3), so such samples fall below
        ``min_confidence`` and are dropped rather than relabelled more often, the safe
        side; one whose share since the takeover reaches it is still relabelled (an
        audit: 16 of 38 relabels on a 20-class run had a changed candidate).

        Why this normaliser: the suggestion only gathers votes while the label is doubted;
        once the network has memorised a flipped label, later presentations predict the
        given label and neither vote nor, here, count. So the confidence of a memorised
        sample no longer changes with the length of training (the previous definition,
        :math:`h_i / k_i`, fell as :math:`1/k_i` past memorisation: on digits the share of
        flips relabelled at its default threshold dropped from 74-75% at 60 epochs to
        12-13% at 120). A flipped sample predicted as its true class from the first epochs until it
        was memorised has :math:`c_i` near 1; a clean sample flagged by mistake, doubted
        for a while with the network's prediction wandering between classes before it
        learned the label, has a lower one. Where :math:`n_i` is exact and
        :math:`c_i > 1/2`, the suggested class was predicted at a strict majority of those
        presentations, hence of the votes: it is the majority the vote is guaranteed to
        find. Samples still misclassified at their last
        presentation are doubted throughout: :math:`n_i = k_i`. Easy samples misclassified
        only at their first presentations can have a high :math:`c_i` from few votes: the
        confidence ranks the suggestions of *flagged* samples (the detection decides which
        those are). No host synchronisation once an epoch is closed; before, a
        ``RuntimeWarning`` says so where a sample was presented more than once (without
        epoch stamps :math:`n_i = k_i`, which understates the confidence).
        """
        from .scores import has_logit_stats, warn_no_epoch_closed

        if has_logit_stats(self):  # (a losses-only run has no suggestion to doubt)
            what = "CSLTracker.suggestions: the confidence is underestimated"
            warn_no_epoch_closed(self, what)  # type: ignore[arg-type]
        return self._suggestions()

    def _suggestions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`suggestions` without its warning, for callers that word their own."""
        b = self._buffers
        label = b["suggest_label"].long()
        if self.sequences:
            # a vocabulary token is no sequence's label: review offered "relabel to 2" for
            # sequences whose first, one-token batch had voted as classification rows
            label = torch.full_like(label, -1)
        has = label >= 0
        hits = b["suggest_hits"].to(self.dtype)
        count = b["csl_count"].to(self.dtype)
        # Votes cast since the candidate took over: hits for it, hits - votes against it.
        doubted = (2 * b["suggest_hits"] - b["suggest_votes"]).to(self.dtype)
        before_fit = count
        if self.epoch > 0:
            learned = b["learned_epoch"]
            per_epoch = count / self.epoch
            before_fit = torch.where(learned >= 0, per_epoch * learned.to(self.dtype), count)
        conf = hits / torch.maximum(before_fit, doubted).clamp(min=MIN_SUGGESTION_SHARE_OF)
        return label, torch.where(has, conf, torch.full_like(conf, math.nan))

    def threshold_learning_time(self) -> torch.Tensor:
        """float ``[N]``: the epoch in which the final correct streak began
        (``learned_epoch``); ``epoch + 1`` (later than any epoch a streak can have begun
        in, the open one included) for samples not correct at their last presentation or
        never presented. Larger means harder (no sign flip)."""
        le = self.learned_epoch
        return torch.where(le >= 0, le, torch.full_like(le, self.epoch + 1)).to(self.dtype)

    def learning_time(self, form: str = "code", tau: float | None = None) -> torch.Tensor:
        r"""Learning time from the per-epoch input-gradient norms (:attr:`input_grad_history`).

        Let :math:`g_{e,i}` be the mean of :math:`\|\partial\ell_i/\partial x_i\|^2` over
        epoch :math:`e`'s records of sample :math:`i`, and
        :math:`r_{e,i} = \operatorname{mean}_{e' \le e} g_{e',i}` its running mean (over
        the epochs with a record). On a tracker of sequences a sequence's input gradient
        is that of the sum of its positions' losses, which grows with its length: long
        sequences rank first (the detectors warn when lengths differ).

        - ``form="code"`` (default; the authors' released code): :math:`\tau` = the global
          mean of :math:`r` over all samples and epochs (unless ``tau`` is given), and the
          score :math:`1 - |\{e : r_{e,i} < \tau\}| / |\{e : r_{e,i}\ \text{defined}\}|` in
          ``[0, 1]``. NaN for samples without any record.
        - ``form="paper"`` (Thm 5.3): :math:`T_i = \min\{e : r_{e,i} \le \tau\}` with a user
          ``tau`` (required), as an absolute epoch number; :attr:`epoch` (one past the last
          closed epoch) when the condition never held; NaN for samples without any record.
          The paper's condition is on :math:`E\|\nabla_{x_i}\ell(w_R)\|^2` with the iterate
          :math:`R` drawn uniformly from the first :math:`T`: the mean over training so
          far, which :math:`r` is per epoch (one epoch's own :math:`g` would call a sample
          learned at its first quiet epoch).

        ``tau``, when given, must be a finite number. Only closed epochs count (call
        :meth:`end_epoch` first). Larger means harder.
        """
        hist = self.input_grad_history.to(torch.float64)
        if isinstance(tau, torch.Tensor) and tau.numel() == 1 and tau.is_floating_point():
            tau = float(tau)  # a threshold computed from another run's norms
        bad_tau = isinstance(tau, bool) or not isinstance(tau, numbers.Real | None)
        if bad_tau or (tau is not None and not math.isfinite(tau)):
            # (NaN compared False everywhere: every sample "never" learned, or all 1.0)
            raise ValueError(f"CSLTracker.learning_time: tau must be a finite number, got {tau!r}")
        if form not in ("code", "paper"):
            raise ValueError(
                f"CSLTracker.learning_time: form must be 'code' or 'paper', got {form!r}"
            )
        if form == "paper" and tau is None:
            raise ValueError("CSLTracker.learning_time(form='paper') needs a threshold tau")
        seen = ~torch.isnan(hist)
        total = torch.where(seen, hist, 0).cumsum(0)
        count = seen.to(torch.float64).cumsum(0)
        running = torch.where(count > 0, total / count.clamp(min=1), float("nan"))
        defined = count > 0
        if form == "paper":
            epochs = hist.shape[0]
            below = running <= tau  # NaN compares False
            stamp = torch.arange(epochs, device=self.device, dtype=torch.float64)[:, None]
            stamp = stamp + self.input_grad_first_epoch
            # (full_like(hist[:1]) had no row when no epoch was closed: amin raised)
            never = torch.full(
                (1, hist.shape[1]), float(self.epoch), dtype=hist.dtype, device=hist.device
            )
            cand = torch.where(below, stamp.expand_as(hist), float("inf"))
            first = torch.cat([cand, never]).amin(0)
            # a sample without any record was not "never below tau": it is unknown
            recorded = seen.any(0)
            return torch.where(recorded, first, float("nan")).to(self.dtype)
        if tau is None:
            tau = running[defined].mean() if hist.numel() else float("nan")
        # (int64 / int64 divides in the default dtype: float32 digits in a float64 score)
        below_count = ((running < tau) & defined).sum(0).to(torch.float64)
        frac_below = below_count / defined.sum(0)
        return (1.0 - frac_below).to(self.dtype)


def _mean_or_nan(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
