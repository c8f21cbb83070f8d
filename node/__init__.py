"""The daemon: services, CLI, control API, scheduler, executor, journal."""
