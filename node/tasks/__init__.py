"""Tasks: the task service (the I/O shell around protocols/scheduler.py), the executor and
its worker processes, the server side of the task protocol, and pull mode."""
