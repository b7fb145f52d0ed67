"""The errors kernl raises on purpose; anything else is a bug."""


class KernlError(Exception):
    """Base of every error kernl raises deliberately."""


class BundleError(KernlError):
    """A bundle is unreadable, corrupt, or built for another machine or version."""


class InputError(KernlError, ValueError):
    """A call got bad arguments: unknown or missing inputs, wrong dtype or rank, shape beyond the buckets."""
