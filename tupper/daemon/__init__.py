"""tupperd: the org.tupper1 D-Bus service, the supervisor of running containers, and the secrets agents."""
