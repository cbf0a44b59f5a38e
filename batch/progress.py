"""The job's progress bar (tqdm, stderr): passes over the experts done of those planned (batch.passes), the
finish time from this run's measured time per pass (PassClock), documents done, and this run's rates.

    passes  37%|████▍       | 740/2000 [1:02:11] ETA 1:45:53 (finish 03:12:40), docs 410/1200, 714 docs/h, ...
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 1.0


class PassClock:
    """Seconds per pass, from the job's engine steps as they run: a step that only decoded times one decode
    pass; a step with prefill passes times them, its decode pass (if any) taken out at the decode rate. The
    finish estimate weighs the passes left of each kind by its own rate (one rate for both until both are
    timed)."""

    def __init__(self):
        self.decode_s = self.mixed_s = 0.0
        self.decode_n = self.mixed_prefill = self.mixed_decode = 0

    def record(self, prefill: int, decode: int, seconds: float) -> None:
        if prefill:
            self.mixed_s += seconds
            self.mixed_prefill += prefill
            self.mixed_decode += decode
        elif decode:
            self.decode_s += seconds
            self.decode_n += decode

    @property
    def timed(self) -> int:
        """Passes timed so far."""
        return self.decode_n + self.mixed_prefill + self.mixed_decode

    def rates(self) -> tuple[float, float] | None:
        """(seconds per prefill pass, per decode pass), or None before any pass is timed."""
        if not self.timed:
            return None
        if not self.decode_n:
            avg = self.mixed_s / (self.mixed_prefill + self.mixed_decode)
            return avg, avg
        td = self.decode_s / self.decode_n
        if not self.mixed_prefill:
            return td, td
        tp = (self.mixed_s - self.mixed_decode * td) / self.mixed_prefill
        if tp <= 0:  # noise: the decode passes of prefill steps were faster than the decode-only ones
            tp = self.mixed_s / (self.mixed_prefill + self.mixed_decode)
        return tp, td

    def remaining(self, prefill_left: int, decode_left: int) -> float | None:
        """Seconds for the passes left, or None (estimating) before a pass is timed."""
        r = self.rates()
        return None if r is None else max(0, prefill_left) * r[0] + max(0, decode_left) * r[1]


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class JobProgress:
    def __init__(self, summary, clock: PassClock, enabled: bool = True):
        from tqdm import tqdm

        self.summary = summary
        self.clock = clock
        self.enabled = enabled
        self.announced = False
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=summary.planned.passes, unit="pass", desc="passes", file=sys.stderr,
                        dynamic_ncols=True, disable=not enabled,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")

    def eta(self) -> str:
        s, p = self.summary, self.summary.planned
        left = self.clock.remaining(p.prefill - s.prefill_passes, p.decode - s.decode_passes)
        if left is None:
            return "ETA estimating"
        finish = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
        return f"ETA {_hms(left)} (finish {finish})"

    def rates(self) -> str:
        s, dt = self.summary, max(time.perf_counter() - self.t0, 1e-9)
        return (f"{self.eta()}, docs {s.skipped + s.failed + s.done}/{s.total}, {s.done / dt * 3600:.0f} docs/h, "
                f"prompt {s.prompt_tokens / dt:.0f} tok/s, gen {s.generated_tokens / dt:.1f} tok/s, "
                f"experts {s.expert_bytes / 1e9:.1f} GB")

    def update(self, finished: int) -> None:
        now = time.perf_counter()
        passes = self.summary.passes
        if self.bar.total is not None and passes > self.bar.total:  # the engine's memory plan split a wave
            self.bar.total = passes
        if not self.announced and self.clock.timed:
            self.announced = True  # the first pass is timed: say when the job ends at most
            tp, td = self.clock.rates()
            if self.enabled:
                self.bar.write(f"flashmoe-batch: {td:.2f} s per decode pass, {tp:.2f} s per prefill pass so far: "
                               f"{self.eta()}", file=sys.stderr)
        if finished or now - self.last >= REFRESH_S:
            self.last = now
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(passes - self.bar.n)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.set_postfix_str(self.rates(), refresh=False)
        self.bar.update(self.summary.passes - self.bar.n)
        self.bar.close()
