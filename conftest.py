"""Repository root marker: lets pytest put the project packages on sys.path."""
