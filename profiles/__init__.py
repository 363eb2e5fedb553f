"""Shipped profiles (`--profile NAME`): TOML files with a [hardware] and/or a [plan] section (README.md)."""
