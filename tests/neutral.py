"""The words of the neutral vocabulary's contract: none of them may reach the API, the
profile files, metric names or CLI output (only the libvirt driver and the benchmark's
re-implementations of other systems use them)."""

from __future__ import annotations

import re

HYPERVISOR_WORDS = re.compile(
    r"post.?copy|suspend|downtime|auto.?converge|xbzrle|libvirt|qemu|virDomain", re.IGNORECASE
)
