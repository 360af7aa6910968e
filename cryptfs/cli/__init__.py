"""The command line, the mount daemon and the FUSE adapter."""
