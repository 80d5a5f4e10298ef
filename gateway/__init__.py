"""aar gateway: the only holder of the Anthropic key; meters tokens and dollars, caps spend."""
