class VitlabError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero."""
