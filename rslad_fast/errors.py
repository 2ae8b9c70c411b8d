"""The one exception type for bad user input.

Library code raises :class:`UserError` for anything the user can fix (a wrong flag, a missing file, a
checkpoint that does not fit). The command-line entry points catch it, print ``error: <message>`` on one
line to stderr and exit with status 2: no traceback, nothing half-written.
"""


class UserError(Exception):
    """Bad input from the user: one clear message, no traceback."""
