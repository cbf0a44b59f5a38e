"""The job's progress bar (tqdm, stderr): passes over the experts done of those planned (batch.passes), the
ETA from this run's time per pass, documents done, and this run's rates.

    passes  37%|████▍       | 740/2000 [1:02:11<1:45:53] docs 410/1200, 714 docs/h, prompt 212 tok/s, gen 26.0 tok/s
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 1.0
ESTIMATE_AFTER = 3  # passes timed before the finish time is estimated


class JobProgress:
    def __init__(self, summary, enabled: bool = True):
        from tqdm import tqdm

        self.summary = summary
        self.enabled = enabled
        self.estimated = False
        self.t0 = self.last = time.perf_counter()
        # smoothing=0: the ETA comes from the average time per pass of this run, not the last burst
        self.bar = tqdm(total=summary.planned.passes, unit="pass", desc="passes", file=sys.stderr, smoothing=0,
                        dynamic_ncols=True, disable=not enabled,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                                   "{postfix}")

    def rates(self) -> str:
        s, dt = self.summary, max(time.perf_counter() - self.t0, 1e-9)
        return (f"docs {s.skipped + s.failed + s.done}/{s.total}, {s.done / dt * 3600:.0f} docs/h, "
                f"prompt {s.prompt_tokens / dt:.0f} tok/s, gen {s.generated_tokens / dt:.1f} tok/s, "
                f"experts {s.expert_bytes / 1e9:.1f} GB")

    def update(self, finished: int) -> None:
        now = time.perf_counter()
        passes = self.summary.passes
        if self.bar.total is not None and passes > self.bar.total:  # the engine's memory plan split a wave
            self.bar.total = passes
        if not self.estimated and passes >= min(ESTIMATE_AFTER, self.bar.total or 0) and passes:
            self.estimated = True  # the time per pass is known now: say when the job ends at most
            left = (now - self.t0) / passes * max(0, (self.bar.total or 0) - passes)
            if self.enabled:
                self.bar.write(f"flashmoe-batch: {(now - self.t0) / passes:.2f} s per pass so far: estimated finish "
                               f"by {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(time.time() + left))}",
                               file=sys.stderr)
        if finished or now - self.last >= REFRESH_S:
            self.last = now
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(passes - self.bar.n)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.set_postfix_str(self.rates(), refresh=False)
        self.bar.update(self.summary.passes - self.bar.n)
        self.bar.close()
