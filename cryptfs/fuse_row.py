"""The layout of a FUSE row of the metrics (``-o metrics``): what the FUSE adapter's wrapper
(:meth:`cryptfs.cli.fuse_ops.CryptfsFUSE._wrapper`) adds into per callback and thread, and
:class:`cryptfs.metrics.FuseRecorder` sums at scrape time. Its own module, free of imports, so
that a mount without metrics does not import ``prometheus_client`` for it.

A row is a list of ``FUSE_WIDTH`` numbers and then a dict: a count per latency bucket of
``FUSE_BUCKETS`` and one for +Inf, the seconds (both over the timed callbacks only: the first
of its kind in each thread and every ``FUSE_SAMPLE``-th after), the bytes the callback
returned, the number of callbacks, a count per errno ``e`` below ``FUSE_ERRNOS`` at
``FUSE_ERRORS + e``; the dict counts larger errnos. Everything but the latency counts every
callback.
"""

from __future__ import annotations

import errno

# one callback in FUSE_SAMPLE (a power of two) of each kind and thread is timed: the two clock
# reads were half of what a record cost (1.4 us per callback, 3 % of a 4 KiB read that hits
# the memory cache; BENCHMARKS.md)
FUSE_SAMPLE = 8
# a FUSE callback costs ~50 us to seconds (a fetch from a slow store)
FUSE_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FUSE_NB = len(FUSE_BUCKETS) + 1  # the bucket counts, +Inf last
FUSE_SECONDS = FUSE_NB
FUSE_BYTES = FUSE_NB + 1
FUSE_CALLS = FUSE_NB + 2
FUSE_ERRORS = FUSE_NB + 3
FUSE_ERRNOS = max(errno.errorcode) + 1
FUSE_WIDTH = FUSE_ERRORS + FUSE_ERRNOS  # then the dict
