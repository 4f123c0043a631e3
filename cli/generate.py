"""placeholder."""
COMMANDS = []
