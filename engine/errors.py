"""The base of every error whose message is meant for a person: one line, shown without a traceback."""


class StylebotError(Exception):
    """A refusal or failure the user can act on; str(e) is the whole message."""
