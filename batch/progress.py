"""The job's progress bar (tqdm, stderr): documents done of the job, ETA, and this run's rates.

    docs  37%|████▍       | 740/2000 [1:02:11<1:45:53] 714 docs/h, prompt 212 tok/s, gen 26.0 tok/s, experts 412.6 GB
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 1.0


class JobProgress:
    def __init__(self, summary, enabled: bool = True):
        from tqdm import tqdm

        self.summary = summary
        self.t0 = self.last = time.perf_counter()
        # smoothing=0: the ETA comes from the average rate of this run, not the last burst of finishes
        self.bar = tqdm(total=summary.total, initial=summary.skipped + summary.failed, unit="doc", desc="docs",
                        file=sys.stderr, smoothing=0, dynamic_ncols=True, disable=not enabled,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
                                   "{postfix}")

    def rates(self) -> str:
        s, dt = self.summary, max(time.perf_counter() - self.t0, 1e-9)
        return (f"{s.done / dt * 3600:.0f} docs/h, prompt {s.prompt_tokens / dt:.0f} tok/s, "
                f"gen {s.generated_tokens / dt:.1f} tok/s, experts {s.expert_bytes / 1e9:.1f} GB")

    def update(self, finished: int) -> None:
        now = time.perf_counter()
        if finished or now - self.last >= REFRESH_S:
            self.last = now
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(finished)
            if not finished:
                self.bar.refresh()

    def close(self) -> None:
        self.bar.set_postfix_str(self.rates(), refresh=False)
        self.bar.close()
