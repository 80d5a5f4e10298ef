"""aar forum: findings forum, content-addressed artifact store and the human web UI."""
