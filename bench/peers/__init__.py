"""Peer servers run side by side with tensoryard: each in its own virtualenv under a cache folder.

`python -m bench.peers.<name>_peer` installs its peer on first use, starts it, waits until it answers,
prints one ready line and stops it on SIGINT/SIGTERM. See `bench/peers/README.md`.
"""
