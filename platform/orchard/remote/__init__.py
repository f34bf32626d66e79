"""Ray Jobs client (submit, list, logs, stop) and the commands that start the stack's services."""
