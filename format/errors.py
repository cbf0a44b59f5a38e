from flashmoe.errors import BundleError, CapacityError, FlashmoeError, InputError  # noqa: F401 (moved; the lead rewrites imports)
