"""Recipe, planning, the Ray driver, evaluation and the CLI."""
