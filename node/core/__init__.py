"""What every service stands on: the home directory and config, the journal, the audit log,
log formatting and hardware detection. Imports nothing else of node/."""
