class LocalMoEError(Exception):
    """A problem the user can fix.

    Its message is one line that says what is wrong and what to do about it; the CLI prints it as is,
    without a traceback, and exits with status 2.
    """
