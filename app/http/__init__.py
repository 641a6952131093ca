"""The HTTP edge: the app factory and its front door, the long-lived services, health, account routes,
and how the web process holds its connections."""
