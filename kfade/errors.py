"""One error type for bad user input: a one-line message naming the offending key and value."""


class ConfigError(ValueError):
    """Bad input, reported as ``key=value: reason`` on one line (entry points print it without a traceback)."""

    def __init__(self, key: str, value, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")
