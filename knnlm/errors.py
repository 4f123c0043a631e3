"""The one exception users see: a sentence that names the problem and the fix."""

import errno
import numbers
import os


class KNNLMError(Exception):
    """A user-facing error; its message is one sentence saying what is wrong and what to do."""


# The machine's errors, not knnlm's (permissions, a read-only mount, a full disk): the command line reports them in
# one sentence, and faiss's index writes are turned into them (index.write_index_file).
USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def os_error_fix(code: int) -> str:
    """What to do about one of USER_ERRNOS."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, or write elsewhere"
    return "run it as a user who may read and write there, or on a copy"


def expect(value, kind: type | tuple[type, ...], name: str, example: str, optional: bool = False) -> None:
    """One sentence, not an AttributeError deep inside, for an API argument of the wrong type.

    kind: the type (or types) value must have (a bool is no number); optional: None is allowed too; example: a
    right value.
    """
    if value is None and optional:
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    abstract = tuple({int: numbers.Integral, float: numbers.Real}.get(k, k) for k in kinds)  # numpy's numbers too
    if isinstance(value, abstract) and (bool in kinds or not isinstance(value, bool)):
        return
    names = " or ".join(k.__name__ for k in kinds)
    article = "an" if names[0].lower() in "aeiou" else "a"
    raise KNNLMError(f"{name} takes {'None or ' if optional else ''}{article} {names}, e.g. {example}, not {value!r} "
                     f"({type(value).__name__}).")


def settle(obj, field: str, kind: type | tuple[type, ...], name: str, example: str, optional: bool = False) -> None:
    """expect() on a config's field (called `name` in the sentence), which then holds its plain Python value (a numpy
    number's .item(): what json, random and faiss take)."""
    value = getattr(obj, field)
    expect(value, kind, name, example, optional)
    if isinstance(value, numbers.Number) and hasattr(value, "item"):
        object.__setattr__(obj, field, value.item())


def settle_text_fields(cfg) -> None:
    """The text settings a build or an add shares: model and device (or None), glob, format and text field."""
    settle(cfg, "model", (str, os.PathLike), "model", "'HuggingFaceTB/SmolLM2-135M'", optional=True)
    if isinstance(cfg.model, os.PathLike):  # a local folder or .gguf file, named as the CLI names it
        object.__setattr__(cfg, "model", os.fspath(cfg.model))
    settle(cfg, "device", str, "device", "'cpu'", optional=True)
    settle(cfg, "glob", str, "glob", "'**/*.txt'")
    settle(cfg, "fmt", str, "fmt", "'auto'")
    settle(cfg, "text_field", str, "text_field", "'text'")
