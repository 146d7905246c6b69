"""The one exception the data pipeline raises for bad input.

Every message names where the problem is (file, file:line, YAML key), what was expected, what was
found and, where there is one, what to do. The command-line tools print it without a traceback.
"""


class DataError(Exception):
    """Bad input to the data pipeline: the message is meant for the user, as is."""


class BadRecord(DataError):
    """One unusable record of a dataset file; `--skip-bad-records` counts these instead."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason
