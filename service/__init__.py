"""The Tightrope gateway: HTTP, auth, persistence and the artifact store. Never imports torch."""
