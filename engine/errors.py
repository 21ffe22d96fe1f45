"""The engine's error for client mistakes."""


class InvalidRequestError(ValueError):
    """A client mistake; ``param`` names the request field at fault (the server's 400 points at it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
