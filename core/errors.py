"""The one user-error type: its message is one line that names the input and what would be right."""


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote
    a library's error inside a one-line ConfigError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
