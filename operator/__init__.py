"""aar operator: reconciles ResearchRun and AgentSandbox into isolated agent sandboxes."""
