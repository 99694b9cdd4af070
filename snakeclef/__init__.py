"""Snake species identification for SnakeCLEF."""
