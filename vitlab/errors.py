class VitlabError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero.

    exit_code: the CLI's exit status. rank_zero_tells: every training process raises the error at
    once (a stop on a signal), so only the first process of the launch prints it."""

    exit_code = 1
    rank_zero_tells = False
