"""The one exception type the CLI turns into a one-line error."""


class LaminaError(Exception):
    """Bad input or an impossible request, found before (or instead of) expensive work."""
