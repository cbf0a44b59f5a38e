"""The flashmoe bundle format: specification (SPEC.md), reader, writer and validator."""

from .bundle import Bundle
from .jsonio import load_json
from .manifest import DENSE_GLOBAL, MANIFEST, build_manifest, dense_layer_path, expert_path, validate_manifest, \
    write_manifest
from .config import TextConfig
from flashmoe.errors import BundleError, CapacityError, FlashmoeError, InputError
from .experts import ExpertFile, ExpertFileInfo, ExpertFileWriter, record_views
from .layout import ExpertQuant, expert_components
from .writer import BundleWriter

__all__ = [
    "Bundle", "BundleError", "BundleWriter", "CapacityError", "FlashmoeError", "InputError", "TextConfig", "ExpertFile", "ExpertFileInfo", "ExpertFileWriter", "ExpertQuant",
    "expert_components", "record_views", "MANIFEST", "DENSE_GLOBAL", "dense_layer_path", "expert_path",
    "build_manifest", "load_json", "validate_manifest", "write_manifest",
]
