"""The build's refusal, apart from every module that raises it (the readers, the remote inputs, the
build state), so that none of them imports another only for it."""

from __future__ import annotations


class BuildError(SystemExit):
    """A refusal or a configuration error: one line for the user, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
        self.message = message
