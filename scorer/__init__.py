"""aar scorer: holds hidden labels, scores submissions, leaderboard and review queue."""
