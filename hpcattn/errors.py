"""User-facing errors: one clear line, printed once by rank 0, non-zero exit on every rank."""


class HpcattnError(Exception):
    """An error the user can fix (bad config, missing input file, unsupported request).

    The CLI prints ``hpcattn: error: <message>`` on rank 0 only and exits with status 2 on all
    ranks. Anything that is not an ``HpcattnError`` is a bug or a system failure: the failing
    rank prints its traceback and the whole job is aborted.
    """


class ConfigError(HpcattnError):
    """A config key, value or combination is invalid."""


class InputError(HpcattnError):
    """An input file (HDF5 activations, results file) is missing or malformed."""
