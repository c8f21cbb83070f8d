"""The `teammesh` command and what only it uses (doctor, top, demo, workflows)."""
