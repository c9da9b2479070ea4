"""Exception types shared across compatkit.

All of them subclass ``ValueError`` so that callers catching bad input keep working; the CLI
turns them into one line of text and a non-zero exit code.
"""


class CompatkitError(ValueError):
    """Bad input or state that a user can fix (the message says how)."""


class UnknownNameError(CompatkitError, KeyError):
    """A name looked up in a registry does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IncompatibleSpacesError(CompatkitError):
    """Two embeddings from spaces with no declared compatibility relation were compared."""


class DataRootError(CompatkitError, FileNotFoundError):
    """A dataset root is missing or does not hold the expected files."""


class MethodNotApplicableError(CompatkitError):
    """A method cannot train on this data split (e.g. PCT when no class is shared)."""
