"""One exception type for everything a user can get wrong.

The CLI turns a `NormlabError` into a single line on stderr (no traceback); the message must name the
problem and the fix.
"""


class NormlabError(ValueError):
    """Bad input or configuration: the message names the setting/file and how to fix it."""
