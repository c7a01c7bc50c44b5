"""The btrfs store and what it holds: images, installed component packages, secrets at rest."""
