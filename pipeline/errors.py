"""The one exception type the CLI turns into a one-line error and exit code 2."""


class PipelineError(Exception):
    """A problem the user can fix. The message says what is wrong and the command that fixes it."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise PipelineError(message)
