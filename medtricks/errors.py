"""The one exception type for bad input that a user can fix.

Every check at an API boundary raises `MedtricksError` (or a subclass) with a message that names the file, key or
value at fault and says what to do. The CLI turns it into a one-paragraph message and exit code 2; any other
exception is a bug and keeps its traceback.
"""


class MedtricksError(ValueError):
    """Bad input from the user: a missing file, a wrong recipe key, an unreadable image, ..."""


class DataError(MedtricksError):
    """A data source, a file in it, or a label cannot be used."""


class RecipeError(MedtricksError):
    """A recipe key or value is wrong."""


class AttackError(MedtricksError):
    """Bad attack settings (eps, steps, norm, target)."""


# The advice that ends every unreadable-image message of a data set (predict, which lists such files, drops it)
UNREADABLE_FIX = ("Re-export the file, or set data.on_error: skip to leave unreadable images out (they are always "
                  "listed).")


def short(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for error messages about user input (a value can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]} ...{text[-1]}"
