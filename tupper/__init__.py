"""tupper: a container runtime in the style of Tupperware (systemd as PID 1, btrfs snapshots, components over D-Bus)."""

__version__ = "0.1.0"
