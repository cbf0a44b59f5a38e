"""flashmoe-publish and flashmoe-pull."""

from __future__ import annotations

import argparse
import sys

from flashmoe.cli import add_common_arguments, run_cli

from .common import Terminated, sigterm_as_interrupt

PUBLISH_EPILOG = """\
Tokens come from HF_TOKEN or `hf auth login` (never printed). The upload resumes: if it is
interrupted, run the same command again. Private storage on free Hub accounts is limited; a
120-230 GB bundle needs a public repo or a paid plan.
"""


def _publish_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashmoe-publish", epilog=PUBLISH_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Verify a converted bundle and upload it, with a model card, to the "
                                            "Hugging Face Hub.")
    p.add_argument("bundle", help="bundle directory (flashmoe-convert's output)")
    p.add_argument("repo_id", help="NAMESPACE/NAME on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist yet)")
    p.add_argument("--revision", help="branch to commit to (created from main if missing); default main")
    p.add_argument("--commit-message", help="summary of the upload commit")
    p.add_argument("--speed", help='measured speed for the model card, e.g. "9.5 tok/s on M3 Max 64 GB"')
    p.add_argument("--retries", type=int, default=5, help="attempts per upload step on network errors (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common_arguments(p)
    return p


def _publish(a: argparse.Namespace) -> int:
    from .common import HubError, is_transient
    from .publish import publish_bundle

    try:
        with sigterm_as_interrupt():
            info = publish_bundle(a.bundle, a.repo_id, private=a.private, revision=a.revision,
                                  commit_message=a.commit_message, speed=a.speed, retries=a.retries,
                                  progress=not a.quiet)
    except KeyboardInterrupt as e:
        print(f"flashmoe-publish: {_stopped(e)}; run the same command again to resume the upload", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # network trouble that outlasted the retries: the user re-runs; anything else is a bug
        if not is_transient(e):
            raise
        # huggingface_hub errors carry the URL, never the token
        raise HubError(f"{type(e).__name__}: {e}. Re-run the same command to resume.") from None
    url = getattr(info, "commit_url", None) or ""
    print(f"published {a.bundle} to {a.repo_id} (commit {info.oid[:12]}) {url}".rstrip())
    print(f"run it with: flashmoe-run {a.repo_id}")
    return 0


def publish_main(argv: list[str] | None = None) -> int:
    return run_cli("flashmoe-publish", _publish_parser(), _publish, argv)


def _pull_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashmoe-pull",
                                description="Download a flashmoe bundle from the Hugging Face Hub and check every "
                                            "file against the sha256 in its manifest (repairing what does not "
                                            "match). Prints the bundle directory.")
    p.add_argument("repo_id", help="NAMESPACE/NAME on the Hub")
    p.add_argument("-o", "--output", help="download into this directory instead of the Hugging Face cache")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--cache-dir", help="Hugging Face cache directory (default HF_HUB_CACHE)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every file even if it was verified before and has not changed since")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shard", metavar="R/N",
                   help="only rank R of N's part for a run on N machines (mlx.launch): its experts (e %% N == R) "
                        "and the dense weights, into -o DIR (README: Several machines)")
    add_common_arguments(p)
    return p


def _pull(a: argparse.Namespace) -> int:
    try:
        with sigterm_as_interrupt():
            return _pull_body(a)
    except KeyboardInterrupt as e:
        print(f"flashmoe-pull: {_stopped(e)}; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def _stopped(e: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def _pull_body(a: argparse.Namespace) -> int:
    from .common import HubError, is_transient
    from .download import pull_bundle

    try:
        if a.shard is not None:
            from .shard import parse_shard, pull_shard

            rank, size = parse_shard(a.shard)
            if a.output is None:
                raise HubError("--shard needs -o DIR: a part of a bundle is kept in its own directory, not in the "
                               "Hugging Face cache")
            path = pull_shard(a.repo_id, rank, size, a.output, revision=a.revision, progress=not a.quiet)
        else:
            path = pull_bundle(a.repo_id, revision=a.revision, local_dir=a.output, cache_dir=a.cache_dir,
                               progress=not a.quiet, full_verify=a.verify)
    except Exception as e:  # network trouble is the user's to retry; anything else is a bug
        if not is_transient(e):
            raise
        raise HubError(f"cannot reach the Hub ({type(e).__name__}: {e}); check the connection and run the "
                       "same command again") from None
    print(path)
    return 0


def pull_main(argv: list[str] | None = None) -> int:
    return run_cli("flashmoe-pull", _pull_parser(), _pull, argv)


if __name__ == "__main__":  # python -m flashmoe.hub.cli publish|pull ...
    cmd, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "publish":
        sys.exit(publish_main(rest))
    if cmd == "pull":
        sys.exit(pull_main(rest))
    print("usage: python -m flashmoe.hub.cli publish|pull ARGS", file=sys.stderr)
    sys.exit(2)
