"""flashmoe.hub: publish converted bundles to the Hugging Face Hub and pull them back, verified.

    from flashmoe.hub import publish_bundle, pull_bundle, resolve_bundle
    publish_bundle("~/models/qwen3.5-397b-q4", "me/Qwen3.5-397B-A17B-flashmoe-q4")
    path = pull_bundle("me/Qwen3.5-397B-A17B-flashmoe-q4")          # HF cache, sha256-verified
    path = resolve_bundle("me/Qwen3.5-397B-A17B-flashmoe-q4")       # what flashmoe-run calls
    path = resolve_bundle("~/models/qwen3.5-397b-q4")                # a local directory: returned as is
"""

from .common import HubError
from .download import pull_bundle, resolve_bundle
from .publish import publish_bundle

# runtime/loader.py calls `from flashmoe.hub import pull; pull(repo_id)`: same as pull_bundle.
pull = pull_bundle

__all__ = ["HubError", "publish_bundle", "pull", "pull_bundle", "resolve_bundle"]
