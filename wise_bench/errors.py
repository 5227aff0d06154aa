class UserError(Exception):
    """A problem with what the user gave (config, data, paths): reported in one line, no traceback."""
