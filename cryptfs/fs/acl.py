"""POSIX ACLs in the kernel's xattr form (``system.posix_acl_access``/``_default``).

The kernel checks ACLs itself (FUSE_CAP_POSIX_ACL, see :mod:`cryptfs.cli.fuse_ops`) and hands the
filesystem what only the filesystem can do, here as pure functions over the xattr bytes, after
the kernel's own ``fs/posix_acl.c``:

- :func:`update_mode`: an access ACL set with setfacl also sets the mode's permission bits; an
  ACL that says no more than the mode is not stored (``posix_acl_update_mode``);
- :func:`chmod`: chmod rewrites the owner, mask (or group) and other entries of the access ACL
  (``posix_acl_chmod``);
- :func:`inherit`: a node made in a directory with a default ACL gets an access ACL from it,
  masked by the mode asked for, instead of the umask; a directory also inherits the default ACL
  itself (``posix_acl_create``).

Xattr layout (little-endian): u32 version 2, then entries of u16 tag, u16 perm, u32 id.
"""

from __future__ import annotations

import errno
import os
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entry = tuple[int, int, int]  # (tag, perm, id)


def _einval() -> OSError:
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def parse(value: bytes) -> list[Entry]:
    """Entries of an ACL xattr; EINVAL for a malformed or invalid one (``posix_acl_valid``)."""
    if len(value) < _HEAD.size or (len(value) - _HEAD.size) % _ENTRY.size:
        raise _einval()
    if _HEAD.unpack_from(value)[0] != VERSION:
        raise _einval()
    entries = [
        _ENTRY.unpack_from(value, off) for off in range(_HEAD.size, len(value), _ENTRY.size)
    ]
    counts = {t: 0 for t in (USER_OBJ, GROUP_OBJ, MASK, OTHER)}
    named = False
    for tag, perm, _id in entries:
        if perm & ~0o7:
            raise _einval()
        if tag in counts:
            counts[tag] += 1
        elif tag in (USER, GROUP):
            named = True
        else:
            raise _einval()
    if counts[USER_OBJ] != 1 or counts[GROUP_OBJ] != 1 or counts[OTHER] != 1:
        raise _einval()
    if counts[MASK] > 1 or (named and not counts[MASK]):
        raise _einval()
    return entries


def serialize(entries: list[Entry]) -> bytes:
    """The xattr form, entries sorted as the kernel sorts them (tag, then id)."""
    out = [_HEAD.pack(VERSION)]
    for tag, perm, id_ in sorted(entries, key=lambda e: (e[0], e[2])):
        plain = tag in (USER_OBJ, GROUP_OBJ, MASK, OTHER)
        out.append(_ENTRY.pack(tag, perm, UNDEFINED_ID if plain else id_))
    return b"".join(out)


def _mode_of(entries: list[Entry]) -> int:
    """Permission bits the ACL gives the mode: owner, mask (or owning group), other."""
    perms = {tag: perm for tag, perm, _id in entries if tag != USER and tag != GROUP}
    group = perms[MASK] if MASK in perms else perms[GROUP_OBJ]
    return (perms[USER_OBJ] << 6) | (group << 3) | perms[OTHER]


def update_mode(value: bytes, mode: int) -> tuple[int, bytes | None]:
    """Setting access ACL ``value`` on a node of ``mode``: the new mode, and the ACL to store
    (None when the three base entries say it all: the mode alone carries it)."""
    entries = parse(value)
    new_mode = (mode & ~0o777) | _mode_of(entries)
    if len(entries) == 3:
        return new_mode, None
    return new_mode, serialize(entries)


def chmod(value: bytes, mode: int) -> bytes:
    """The access ACL after chmod to ``mode``: owner and other take the mode's bits, and the
    mask (the owning group's entry when there is no mask) the group bits."""
    entries = parse(value)
    group_tag = MASK if any(t == MASK for t, _p, _i in entries) else GROUP_OBJ
    out = []
    for tag, perm, id_ in entries:
        if tag == USER_OBJ:
            perm = (mode >> 6) & 7
        elif tag == OTHER:
            perm = mode & 7
        elif tag == group_tag:
            perm = (mode >> 3) & 7
        out.append((tag, perm, id_))
    return serialize(out)


def inherit(default: bytes, mode: int, is_dir: bool) -> tuple[int, bytes | None, bytes | None]:
    """A node of ``mode`` (the umask not applied) made in a directory whose default ACL is
    ``default``: its mode, its access ACL (None if the mode carries it) and, for a directory,
    its default ACL (``posix_acl_create_masq``)."""
    entries = parse(default)
    out: list[Entry] = []
    has_mask = any(t == MASK for t, _p, _i in entries)
    for tag, perm, id_ in entries:
        if tag == USER_OBJ:
            perm &= (mode >> 6) & 7
        elif tag == OTHER:
            perm &= mode & 7
        elif tag == MASK or (tag == GROUP_OBJ and not has_mask):
            perm &= (mode >> 3) & 7
        out.append((tag, perm, id_))
    new_mode = (mode & ~0o777) | _mode_of(out)
    access = serialize(out) if len(out) > 3 else None
    return new_mode, access, default if is_dir else None
