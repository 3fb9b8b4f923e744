"""The exception type the CLIs turn into one ``error: ...`` line, and how messages show values."""

from __future__ import annotations

import reprlib

# Longest echo of one user value, and of a whole error line: a small YAML file can hold a value
# whose repr is gigabytes long (aliases nest lists exponentially), so nothing is echoed in full.
VALUE_LIMIT = 160
LINE_LIMIT = 2000

class _Repr(reprlib.Repr):
    def repr_int(self, x, level):  # repr() refuses ints of more than 4300 digits
        return super().repr_int(x, level) if x.bit_length() < 4000 else f"<an integer of {x.bit_length()} bits>"


_repr = _Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 8, 8, 6, 6
_repr.maxstring, _repr.maxother, _repr.maxlong = VALUE_LIMIT, VALUE_LIMIT, 40


class MergeError(Exception):
    """A user-facing problem with the config, an input model or the output folder.

    The message names the model, file, tensor or key involved and the offending value.
    """


def brief(value, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (containers to their first items,
    never expanded in full), for echoing user values in messages."""
    return clip(_repr.repr(value), limit)


def clip(text: str, limit: int = VALUE_LIMIT) -> str:
    """A plain string (a path, a library's message) cut to at most ``limit`` characters."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 24] + f"... ({len(text)} chars)"


def one_line(message: str, limit: int = LINE_LIMIT) -> str:
    """An error message as one line of at most ``limit`` characters (a CLI prints one line)."""
    text = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return clip(text, limit)


def write_failed(path: str, exc: OSError) -> MergeError:
    """The error for a failed write (disk full, permissions) into the temporary output."""
    return MergeError(f"writing {clip(path)} failed: {exc.strerror or exc} (no output was written; "
                      f"free space or fix permissions and rerun)")
