"""The one user-error type: its message is one line that names the input and what would be right."""


class ConfigError(ValueError):
    """A user error in a config file or an override; the message is one line."""
