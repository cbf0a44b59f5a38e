"""flashmoe.batch: resumable batch jobs (OpenAI Batch format) through the continuous-batching engine.

    from flashmoe.batch import JobOptions, run_jobs
    summary = run_jobs(model, tokenizer, "requests.jsonl", "answers.jsonl", JobOptions())
"""

from .requests import Defaults
from .runner import JobOptions, JobSummary, run_jobs

__all__ = ["Defaults", "JobOptions", "JobSummary", "run_jobs"]
