"""What every aar component shares: agent credentials, the HTTP service plumbing and SQLite.

Kept small on purpose: only code that two or more components need lives here."""
