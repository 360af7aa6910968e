"""cryptfs: an encrypted, chunked, tamper-evident FUSE filesystem."""
