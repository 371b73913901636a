"""Model definitions, the architecture registry, checkpoint loading and the built-in tiny checkpoint."""
