"""aar agent runtime: the Claude research loop and its tools, run inside each sandbox."""
