"""Exit codes of ``stable-avatar``, so scripts can tell "fix the input" from "fix the key" from "try again"."""

EXIT_FAILED = 1  # the job failed on the server, the server is unreachable, an unknown request id, nothing to cancel
EXIT_BAD_INPUT = 2  # an input was rejected (argparse, local check, 422, or 413/415 for a media file)
EXIT_AUTH = 3  # the API key is missing (401) or wrong (403)
EXIT_INTERRUPTED = 130  # Ctrl-C
