"""Adapters to what a container is made of: systemd-nspawn, the container's systemd, cgroups, mounts, files in its root."""
