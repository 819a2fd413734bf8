"""The one exception type for bad user input.

Everything a user can get wrong (an unknown op name, a malformed layout, a
corrupt archive, a checkpoint from another configuration) raises
``FastDartsError`` with a one-line message that names the problem. The CLIs
print that line and exit non-zero instead of showing a traceback.
"""


class FastDartsError(ValueError):
    """Bad input, reported to the user as one line."""
