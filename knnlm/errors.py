"""The one exception users see: a sentence that names the problem and the fix."""


class KNNLMError(Exception):
    """A user-facing error; its message is one sentence saying what is wrong and what to do."""
