"""Orchestration of a migration's two sides around the session client, the state store,
the replayer and the diff protocol."""
