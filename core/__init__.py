"""What every package shares: errors, the CLI runner, the typed-config machinery, atomic writes."""
