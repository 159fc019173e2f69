"""The one error type users see, and how its messages name settings."""

from collections.abc import Callable

MARK = "\x1f"  # brackets a setting's name inside a message; never shown


def setting(name: str) -> str:
    """A setting named in an error message (a field of `RuntimeOptions`, or a generation argument such as
    max_new_tokens), for whoever shows the message to spell in its own terms: see `LocalMoEError.phrased`."""
    return f"{MARK}{name}{MARK}"


class LocalMoEError(Exception):
    """A problem the user can fix.

    Its message is one line that says what is wrong and what to do about it; the CLI prints it without a
    traceback and exits with status 2, the server answers 400. Settings in it are marked by `setting`:
    `str()` names them as the Python API does, the CLI as flags, the server in an HTTP client's terms.
    """

    def phrased(self, spell: Callable[[str], str]) -> str:
        """The message with each setting's name spelled by `spell`."""
        parts = str(self.args[0] if self.args else "").split(MARK)
        return "".join(spell(part) if i % 2 else part for i, part in enumerate(parts))

    def __str__(self) -> str:
        return self.phrased(lambda name: name)


def as_flag(name: str) -> str:
    """A setting as the CLI's flag: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")
