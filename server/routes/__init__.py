"""One router per API area; ``app.create_app`` mounts them all."""
