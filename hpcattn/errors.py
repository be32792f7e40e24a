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


def shown(text: str) -> str:
    """``text`` printable and storable as UTF-8: a byte that is not UTF-8 (kept by Python as a lone
    surrogate in command-line arguments and file names) is shown as its ``\\xNN`` escape."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_utf8_path(what: str, path: str) -> None:
    """Raise InputError naming ``what`` when ``path`` is not valid UTF-8 (the record stores paths
    as UTF-8 text: such a name could not be written, nor re-run from the stored config)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} {shown(path)}: the path is not valid UTF-8 (byte "
                         f"{shown(path[e.start])} at position {e.start}); hpcattn keeps paths as UTF-8 "
                         f"text in the record: rename it, or give a link with a UTF-8 name") from None
