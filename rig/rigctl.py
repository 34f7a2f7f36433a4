"""rigctl — helpers for tests that use the real two-host libvirt + QEMU rig.

Stdlib + libvirt-python only (no lmwatch imports), importable from tests:

    import sys; sys.path.insert(0, "rig")      # or put rig/ on PYTHONPATH
    import rigctl
    ok, why = rigctl.rig_available()
    dom = rigctl.define_guest("a", "vm1", write_mib=32, rate_mib=40, labels={"tier": "database"})
    rigctl.wait_heartbeat("vm1", timeout=60)
    dom.migrateToURI3(rigctl.host_uri("b"), rigctl.migrate_params(), rigctl.MIGRATE_FLAGS)

The rig is brought up by rig/setup.sh (once) and rig/up.sh, and torn down by rig/down.sh.

Serial logs (the guest's heartbeats): every guest's serial console goes to the file
``/var/log/libvirt/qemu/<name>.serial.log`` *as seen by the host's libvirtd*; each host
has its own /var/log/libvirt, so on the machine the files are
``$LMWATCH_RIG_DIR/a/log/qemu/<name>.serial.log`` and ``.../b/log/...``.  After a
migration the destination's QEMU opens (appends to) the file of the destination host:
the source file ends with the last heartbeat before the switch, the destination file
continues the same counter ``n``.  ``last_heartbeat`` reads the file of the host
where the guest runs (newest file when it runs nowhere or on both).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import struct
import subprocess
import threading
import time
from xml.sax.saxutils import escape, quoteattr

try:  # importable without libvirt-python, so that rig_available() can say why
    import libvirt  # type: ignore
except ImportError:  # pragma: no cover - reported by rig_available()
    libvirt = None  # type: ignore

HOSTS: tuple[str, str] = ("a", "b")
# Which of the rigs that may run side by side (rig/lib.sh): its state directory and
# migration ports. Read once, at import (tests set it per pytest worker before).
SLOTS = 4  # LMWATCH_RIG_SLOT 0-3
SLOT = int(os.environ.get("LMWATCH_RIG_SLOT", "0"))
if not 0 <= SLOT < SLOTS:
    raise ValueError(f"LMWATCH_RIG_SLOT must be 0-{SLOTS - 1}, not {SLOT}")
RIG_DIR = os.environ.get("LMWATCH_RIG_DIR", "/run/lmwatch-rig") + (f"-{SLOT}" if SLOT else "")
CACHE_DIR = os.environ.get("LMWATCH_RIG_CACHE", "/var/cache/lmwatch-rig")
GUEST_DIR = os.path.join(CACHE_DIR, "current")
KERNEL = os.path.join(GUEST_DIR, "vmlinuz")
INITRD = os.path.join(GUEST_DIR, "initrd.img")
RIG_SRC = os.path.dirname(os.path.abspath(__file__))
LABELS_NS = "https://lmwatch.dev/xmlns/labels/1"
EMULATOR = "/usr/bin/qemu-system-x86_64"
# the path inside each host's view; bind-mounted to $RIG_DIR/<host>/log/qemu/
GUEST_SERIAL_PATH = "/var/log/libvirt/qemu/{name}.serial.log"

_HB_RE = re.compile(r"^hb ((?:\w+=\w+ ?)+)\s*$")
_DK_RE = re.compile(r"^dk (done )?((?:\w+=\w+ ?)+)\s*$")
_DKSUM_RE = re.compile(r"^dksum ([0-9a-f]{64})\s*$")
# each host's storage pool for instance disks (rig/lib.sh: ensure_pool), as libvirt
# sees it; on the machine it is $RIG_DIR/<host>/lib/images
POOL = "lmw-images"
POOL_TARGET = "/var/lib/libvirt/images"
DISK_BLOCK = 4096
DISK_MAGIC = 0x6C6D776469736B0A  # "lmwdisk\n", as in guest/diskw.c
WRITER_MODES = ("seq", "random")  # lmw.mode: sweep pages in order, or pick them at random


# --------------------------------------------------------------------------- hosts


def host_dir(host: str) -> str:
    if host not in HOSTS:
        raise ValueError(f"unknown rig host {host!r} (expected 'a' or 'b')")
    return os.path.join(RIG_DIR, host)


def host_socket(host: str) -> str:
    return os.path.join(host_dir(host), "sock", "libvirt-sock")


def host_uri(host: str) -> str:
    """libvirt URI of rig host "a" or "b"."""
    return "qemu+unix:///system?socket=" + host_socket(host)


URI_A = host_uri("a")
URI_B = host_uri("b")


def other_host(host: str) -> str:
    _check_host(host)
    return "b" if host == "a" else "a"


def connect(host: str):
    """A new read-write connection to rig host "a" or "b" (caller closes it)."""
    _need_libvirt()
    return libvirt.open(host_uri(host))


def migrate_params(**extra) -> dict:
    """migrateToURI3 parameters that keep QEMU's data on loopback (always pass these)."""
    _need_libvirt()
    p = {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
        libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
    }
    p.update(extra)
    return p


def migrate_flags(postcopy: bool = False, auto_converge: bool = False) -> int:
    """LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE (+ POSTCOPY / AUTO_CONVERGE)."""
    _need_libvirt()
    f = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    if postcopy:
        f |= libvirt.VIR_MIGRATE_POSTCOPY
    if auto_converge:
        f |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    return f


def hold_handover_transfer(host: str, name: str, mib_per_second: int) -> None:
    """Cap the transfer after a switch to the destination (QEMU's separate
    post-copy bandwidth; unlimited by default, so the rest arrives in a blink)."""
    _need_libvirt()
    conn = connect(host)
    try:
        dom = _find(conn, name)
        if dom is None:
            raise RuntimeError(f"{name} is not on {host}")
        dom.migrateSetMaxSpeed(mib_per_second, libvirt.VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY)
    finally:
        conn.close()


# both hosts' migration_port_min..max (lib.sh: host_ports): this slot's, and every slot's
MIGRATION_PORTS = (49152 + 128 * SLOT, 49279 + 128 * SLOT)
ALL_MIGRATION_PORTS = (49152, 49151 + 128 * SLOTS)


def break_migration_streams() -> int:
    """Reset every TCP connection on the hosts' migration ports (`ss -K`): what a
    link that breaks under a migration looks like to QEMU (its stream fails at once).
    Returns how many sockets were closed; raises RuntimeError when `ss` cannot."""
    low, high = MIGRATION_PORTS
    ports = f"( sport >= :{low} and sport <= :{high} ) or ( dport >= :{low} and dport <= :{high} )"
    done = subprocess.run(["ss", "-K", "-tnH", ports], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ss -K failed ({done.returncode}): {done.stderr.strip()}")
    return len([line for line in done.stdout.splitlines() if line.strip()])


# `stall_migration_streams` adds it; rig/up.sh drops a leftover (lib.sh: STALL_TABLE)
STALL_TABLE = "lmwatch_rig_stall" + (f"_{SLOT}" if SLOT else "")


def stall_migration_streams() -> None:
    """Drop every packet of the connections made to the hosts' migration ports
    (nftables, both directions, by the connection's original destination port: a
    client whose own ephemeral port falls in that range, such as a test's request to
    the daemon, is not touched): what a link that stalls under a migration looks like
    to QEMU. Nothing moves and nothing fails at once (TCP retransmits into the void, for
    minutes), unlike `break_migration_streams`. `unstall_migration_streams` lets
    packets through again."""
    low, high = MIGRATION_PORTS
    ruleset = (
        f"table inet {STALL_TABLE} {{\n"
        "  chain out {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    meta l4proto tcp ct original proto-dst {low}-{high} drop\n"
        "  }\n"
        "}\n"
    )
    done = subprocess.run(
        ["nft", "-f", "-"], input=ruleset, capture_output=True, text=True, timeout=10
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft failed ({done.returncode}): {done.stderr.strip()}")


def unstall_migration_streams() -> bool:
    """Remove what `stall_migration_streams` added; True when it was there."""
    done = subprocess.run(
        ["nft", "delete", "table", "inet", STALL_TABLE], capture_output=True, text=True, timeout=10
    )
    return done.returncode == 0


def rig_available() -> tuple[bool, str]:
    """(True, "") when tests can use the rig, else (False, why) — for pytest.skip."""
    if libvirt is None:
        return False, "libvirt-python is not importable (run rig/setup.sh)"
    if os.geteuid() != 0:
        return False, "the rig needs root"
    if not (os.path.isfile(KERNEL) and os.path.isfile(INITRD)):
        return False, f"rig guest not built ({GUEST_DIR}; run rig/setup.sh)"
    for h in HOSTS:
        if not os.path.exists(host_socket(h)):
            up = f"LMWATCH_RIG_SLOT={SLOT} rig/up.sh" if SLOT else "rig/up.sh"
            return False, f"rig host {h} is not up (run {up})"
        try:
            c = libvirt.open(host_uri(h))
            c.getLibVersion()
            c.close()
        except libvirt.libvirtError as e:
            return False, f"rig host {h} does not answer: {e}"
    return True, ""


def up() -> list[str]:
    """Run rig/up.sh (idempotent); returns the two URIs."""
    subprocess.run([os.path.join(RIG_SRC, "up.sh")], check=True, stdout=subprocess.DEVNULL)
    return [host_uri(h) for h in HOSTS]


def down() -> None:
    subprocess.run([os.path.join(RIG_SRC, "down.sh")], check=True)


def restart_host(host: str, what: str = "restart") -> None:
    """SIGTERM the host's libvirtd and start it again ("stop"/"start" for one half).

    Stopping waits for the daemon to exit: with a migration in flight that can take
    up to ~30 s.  Running guests survive; the new daemon re-attaches to them."""
    _check_host(host)
    subprocess.run([os.path.join(RIG_SRC, "restart-host.sh"), host, what], check=True)


# --------------------------------------------------------------------------- guests


def domain_xml(
    name: str,
    mem_mib: int = 128,
    write_mib: int = 0,
    rate_mib: int = 0,
    labels: dict[str, str] | None = None,
    selftest: int = 0,
    vcpus: int = 1,
    mode: str = "seq",
    disk: dict | None = None,
) -> str:
    """Domain XML of a rig guest (type='qemu': TCG, kernel+initramfs, no disk).

    mode: how the writer picks pages, "seq" (in order, wrapping around) or "random"
    (uniformly over write_mib).
    disk: the disk variant, {"rate_kib": K, "secs": T, "mib": M, "selftest": S}: a raw
    virtio disk `vda` at `disk_image_path(name)` (in the host's pool) that the guest's
    disk writer writes at K KiB/s for T s into its first M MiB (0: all), then checks
    and checksums (see guest/diskw.c)."""
    if mode not in WRITER_MODES:
        raise ValueError(f"unknown writer mode {mode!r} (expected one of {WRITER_MODES})")
    cmdline = (
        f"console=ttyS0 panic=-1 loglevel=4 mitigations=off "
        f"lmw.mib={int(write_mib)} lmw.rate={int(rate_mib)} lmw.selftest={int(selftest)} "
        f"lmw.mode={mode}"
    )
    disk_xml = ""
    if disk is not None:
        cmdline += (
            f" lmw.dkrate={max(1, int(disk.get('rate_kib', 256)))}"
            f" lmw.dksecs={int(disk.get('secs', 60))} lmw.dkmib={int(disk.get('mib', 0))}"
            f" lmw.dkselftest={int(disk.get('selftest', 0))}"
        )
        disk_xml = f"""<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(disk_image_path(name))}/>
      <target dev='vda' bus='virtio'/>
    </disk>"""
    meta = ""
    if labels:
        items = "".join(
            f"<lmw:label name={quoteattr(str(k))}>{escape(str(v))}</lmw:label>"
            for k, v in labels.items()
        )
        meta = f'<metadata><lmw:labels xmlns:lmw="{LABELS_NS}">{items}</lmw:labels></metadata>'
    serial = GUEST_SERIAL_PATH.format(name=name)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  {meta}
  <memory unit='MiB'>{int(mem_mib)}</memory>
  <vcpu>{int(vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{KERNEL}</kernel>
    <initrd>{INITRD}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <controller type='usb' model='none'/>
    {disk_xml}
    <serial type='file'>
      <source path={quoteattr(serial)} append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def define_guest(
    host: str,
    name: str,
    mem_mib: int = 128,
    write_mib: int = 0,
    rate_mib: int = 0,
    persistent: bool = True,
    labels: dict[str, str] | None = None,
    selftest: int = 0,
    start: bool = True,
    replace: bool = True,
    mode: str = "seq",
    disk: dict | None = None,
):
    """Define (persistent) or create (transient) and start guest `name` on `host`.

    write_mib/rate_mib: the guest rewrites write_mib MiB at rate_mib MiB/s (0 = idle,
    memory stamped once and verified every second).  mode: "seq" sweeps the pages in
    order, "random" picks each written page at random (see `domain_xml`).
    selftest=S flips one bit S s after the writer started (its heartbeat must then
    show bad>0).  labels become
    <metadata><lmw:labels xmlns:lmw="https://lmwatch.dev/xmlns/labels/1">.
    replace=True first destroys/undefines a guest of that name on both hosts and
    truncates its serial logs.  Returns the virDomain (its connection stays open).
    disk: the disk variant (see `domain_xml`); its image must exist on `host` first
    (`make_disk_image`)."""
    _need_libvirt()
    if replace:
        destroy_everywhere(name)
    for path in serial_log(name).values():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    xml = domain_xml(name, mem_mib, write_mib, rate_mib, labels, selftest, mode=mode, disk=disk)
    conn = connect(host)
    if persistent:
        dom = conn.defineXML(xml)
        if start:
            dom.create()
    else:
        if not start:
            raise ValueError("a transient guest is always started")
        dom = conn.createXML(xml, 0)
    return dom


def _find(conn, name: str):
    # listAllDomains instead of lookupByName: a miss must not print libvirt's default error
    for dom in conn.listAllDomains(0):
        if dom.name() == name:
            return dom
    return None


def lookup(host: str, name: str):
    """virDomain of `name` on `host` (on a new connection), or None."""
    _need_libvirt()
    conn = connect(host)
    dom = _find(conn, name)
    if dom is None:
        conn.close()
    return dom


def domain_states(name: str) -> dict[str, tuple[int, int] | None]:
    """{host: (state, reason) or None when not defined there} (libvirt VIR_DOMAIN_* codes)."""
    _need_libvirt()
    out: dict[str, tuple[int, int] | None] = {}
    for h in HOSTS:
        conn = connect(h)
        try:
            dom = _find(conn, name)
            st = dom.state() if dom is not None else None
            out[h] = (st[0], st[1]) if st is not None else None
        except libvirt.libvirtError:
            out[h] = None
        finally:
            conn.close()
    return out


def where_running(name: str) -> list[str]:
    """Hosts on which `name` is in state RUNNING (normally zero or one)."""
    _need_libvirt()
    return [
        h
        for h, st in domain_states(name).items()
        if st is not None and st[0] == libvirt.VIR_DOMAIN_RUNNING
    ]


def where_active(name: str) -> list[str]:
    """Hosts on which `name` has a QEMU process (running, paused, incoming, ...)."""
    _need_libvirt()
    return [
        h
        for h, st in domain_states(name).items()
        if st is not None and st[0] not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE)
    ]


def destroy_everywhere(name: str) -> None:
    """Destroy and undefine `name` on both hosts (aborting a migration job first)."""
    _need_libvirt()
    for h in HOSTS:
        try:
            conn = connect(h)
        except libvirt.libvirtError:
            continue
        dom = _find(conn, name)
        if dom is None:
            conn.close()
            continue
        try:
            if dom.isActive():
                try:
                    if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                        dom.abortJob()
                except libvirt.libvirtError:
                    pass
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            if dom.isPersistent():
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()


# --------------------------------------------------------------------------- heartbeats


def serial_log(name: str, host: str | None = None):
    """Serial log path of `name` on `host`, or {host: path} for both hosts."""
    if host is not None:
        return os.path.join(host_dir(host), "log", "qemu", f"{name}.serial.log")
    return {h: serial_log(name, h) for h in HOSTS}


def qemu_log(name: str, host: str) -> str:
    """QEMU's own stdout/stderr log of `name` on `host` (errors at start, migration)."""
    return os.path.join(host_dir(host), "log", "qemu", f"{name}.log")


def parse_heartbeat(line: str) -> dict | None:
    """'hb n=12 gen=3 bad=0 w=... mode=seq' -> {'n': 12, 'gen': 3, 'bad': 0, ..., 'mode': 'seq'}
    or None.  Numbers become ints, words (mode) stay strings."""
    m = _HB_RE.match(line.strip().replace("\r", ""))
    if not m:
        return None
    return {
        k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in m.group(1).split())
    }


def heartbeats(name: str, host: str) -> list[dict[str, int]]:
    """All heartbeats in `name`'s serial log on `host` (oldest first)."""
    try:
        with open(serial_log(name, host), errors="replace") as f:
            return [hb for hb in map(parse_heartbeat, f) if hb]
    except FileNotFoundError:
        return []


def _tail_heartbeat(path: str) -> dict[str, int] | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(data.splitlines()):
        hb = parse_heartbeat(line)
        if hb:
            return hb
    return None


def last_heartbeat(name: str, host: str | None = None) -> dict[str, int] | None:
    """Latest heartbeat {'n','gen','bad','w','mib','rate', 'host'} of `name`, or None.

    Without `host`: the serial log of the host where the guest runs; if it runs on
    none or both (mid-migration), the most recently written log."""
    if host is None:
        try:
            running = where_running(name) if libvirt is not None else []
        except Exception:
            running = []
        if len(running) == 1:
            host = running[0]
        else:
            paths = [
                (os.stat(p).st_mtime_ns, h)
                for h, p in serial_log(name).items()
                if os.path.exists(p)
            ]
            if not paths:
                return None
            host = max(paths)[1]
    hb = _tail_heartbeat(serial_log(name, host))
    if hb is not None:
        hb["host"] = host  # type: ignore[assignment]
    return hb


def wait_heartbeat(
    name: str, timeout: float = 60.0, min_n: int = 1, host: str | None = None
) -> dict[str, int]:
    """Wait until a heartbeat with n >= min_n appears (guest booted); return it.

    Raises TimeoutError with the tail of the serial log."""
    deadline = time.monotonic() + timeout
    while True:
        hb = last_heartbeat(name, host)
        if hb is not None and hb["n"] >= min_n:
            return hb
        if time.monotonic() > deadline:
            tails = {h: _tail_text(p) for h, p in serial_log(name).items()}
            raise TimeoutError(
                f"no heartbeat n>={min_n} from {name} within {timeout}s; serial tails: {tails}"
            )
        time.sleep(0.25)


def heartbeats_continue(name: str, seconds: float = 3.0) -> bool:
    """True if the guest's heartbeat counter advances during `seconds` (at least
    half as many beats as seconds, and at least one): the guest is alive and running."""
    first = last_heartbeat(name)
    time.sleep(seconds)
    last = last_heartbeat(name)
    if first is None or last is None:
        return False
    return last["n"] - first["n"] >= max(1, int(seconds / 2))


def _tail_text(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return "<no file>"


# --------------------------------------------------------------------------- disks


def disk_image_path(name: str, host: str | None = None) -> str:
    """The disk image of guest `name`: the path libvirt sees (no host), or the file
    on the machine for `host` (each host has its own, in its own pool)."""
    if host is None:
        return f"{POOL_TARGET}/{name}.img"
    return os.path.join(host_dir(host), "lib", "images", f"{name}.img")


def make_disk_image(host: str, name: str, mib: int = 64, seed: int | None = None) -> str:
    """Create `name`'s raw disk image on `host`, `mib` MiB of pseudo-random bytes (so
    that the copy has to move every block and an untouched image differs from a
    written one); removes the image on the other host. Refreshes both pools.
    Returns the file's path on the machine."""
    path = disk_image_path(name, host)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(int(mib)):
            f.write(rng.randbytes(1 << 20))
    remove_disk_image(other_host(host), name)
    refresh_pools()
    return path


def remove_disk_image(host: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(disk_image_path(name, host))


def refresh_pools() -> None:
    """Let each host's pool see files created or removed behind its back."""
    _need_libvirt()
    for h in HOSTS:
        conn = connect(h)
        try:
            conn.storagePoolLookupByName(POOL).refresh(0)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mix(idx: int, gen: int) -> int:
    m = (1 << 64) - 1
    x = ((idx * 0x9E3779B97F4A7C15) & m) ^ ((gen + 0x632BE59BD9B4E019) & m)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    return x ^ DISK_MAGIC


def check_disk_image(path: str, mib: int = 0) -> dict[str, int]:
    """Check the guest's stamped blocks in an image file on the machine, as the guest
    does: {"stamped": blocks that carry the stamp of their own index, "bad": those of
    them whose content is not exactly what that index and generation give}. Blocks
    never written (the random fill) carry no stamp. `mib`: only the first MiB (0: all)."""
    stamped = bad = 0
    limit = int(mib) * (1 << 20) if mib else None
    with open(path, "rb") as f:
        idx = 0
        while limit is None or idx * DISK_BLOCK < limit:
            block = f.read(DISK_BLOCK)
            if len(block) < DISK_BLOCK:
                break
            words = struct.unpack(f"<{DISK_BLOCK // 8}Q", block)
            if words[0] == DISK_MAGIC ^ idx:
                stamped += 1
                h = _mix(idx, words[1])
                want = [(h + w) & ((1 << 64) - 1) for w in range(2, DISK_BLOCK // 8)]
                if list(words[2:]) != want:
                    bad += 1
            idx += 1
    return {"stamped": stamped, "bad": bad}


def parse_disk_line(line: str) -> dict | None:
    """'dk n=3 w=384 blocks=384 diskbad=0' -> {'n': 3, ..., 'done': False}; the final
    'dk done ...' line has 'done': True; 'dksum HEX' -> {'sum': HEX}. Else None."""
    text = line.strip().replace("\r", "")
    m = _DKSUM_RE.match(text)
    if m:
        return {"sum": m.group(1)}
    m = _DK_RE.match(text)
    if not m:
        return None
    out: dict = {
        k: int(v) if v.isdigit() else v for k, v in (kv.split("=") for kv in m.group(2).split())
    }
    out["done"] = bool(m.group(1))
    return out


def disk_lines(name: str, host: str) -> list[dict]:
    """Every disk-writer line in `name`'s serial log on `host`, oldest first."""
    try:
        with open(serial_log(name, host), errors="replace") as f:
            return [d for d in map(parse_disk_line, f) if d]
    except FileNotFoundError:
        return []


def wait_disk_sum(name: str, host: str, timeout: float = 120.0) -> tuple[dict, str]:
    """Wait for the disk writer's final line and the guest's checksum on `host`'s
    serial log: returns ({'w', 'blocks', 'diskbad', ...}, sha256 hex)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = disk_lines(name, host)
        done = [d for d in lines if d.get("done")]
        sums = [d["sum"] for d in lines if "sum" in d]
        if done and sums:
            return done[-1], sums[-1]
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no disk checksum from {name} on {host} within {timeout}s; "
                f"serial tail: {_tail_text(serial_log(name, host))}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- direct migrations


class DirectMigration:
    """One migration started directly with libvirt, for tests that measure the rig.

    ``migrateToURI3`` runs in a thread of its own (it blocks until the migration
    ends); ``run`` polls ``jobStats()`` on a second connection every ``interval``
    seconds and keeps every sample as ``(seconds since start, stats)``.  No libvirt
    event loop is registered (an in-process driver may own it).

        m = DirectMigration("vm1", "a", "b", max_speed_mib=16, max_downtime_ms=300)
        m.start(); m.run(timeout=60, abort_after=20)
        m.error, m.aborted, m.elapsed, m.samples, m.completed

    ``max_speed_mib``/``max_downtime_ms`` are set on the domain before the start
    (``migrateSetMaxSpeed``/``migrateSetMaxDowntime``).  ``flags`` default to
    `migrate_flags()`, ``params`` to `migrate_params()`.
    """

    def __init__(
        self,
        name: str,
        src: str,
        dst: str,
        *,
        flags: int | None = None,
        params: dict | None = None,
        max_speed_mib: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> None:
        _need_libvirt()
        self.name, self.src, self.dst = name, src, dst
        self.flags = migrate_flags() if flags is None else flags
        self.params = migrate_params() if params is None else dict(params)
        self.samples: list[tuple[float, dict]] = []
        self.error: Exception | None = None
        self.aborted = False
        self.completed: dict = {}  # completed job statistics (destination, else source)
        self.t_start = 0.0
        self.t_end: float | None = None
        self._conn = connect(src)
        self._dom = self._conn.lookupByName(name)
        self._poll_conn = connect(src)
        self._poll_dom = self._poll_conn.lookupByName(name)
        if max_speed_mib is not None:
            self._dom.migrateSetMaxSpeed(int(max_speed_mib), 0)
        if max_downtime_ms is not None:
            self._dom.migrateSetMaxDowntime(int(max_downtime_ms), 0)
        self._thread = threading.Thread(target=self._migrate, daemon=True, name=f"mig-{name}")

    def _migrate(self) -> None:
        try:
            self._dom.migrateToURI3(host_uri(self.dst), self.params, self.flags)
        except libvirt.libvirtError as e:
            self.error = e
        finally:
            self.t_end = time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds from start to the return of the migrate call (so far, if running)."""
        end = self.t_end if self.t_end is not None else time.monotonic()
        return end - self.t_start

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> DirectMigration:
        self.t_start = time.monotonic()
        self._thread.start()
        return self

    def poll(self) -> dict | None:
        """One jobStats sample (kept in ``samples``), or None when there is no job."""
        try:
            st = self._poll_dom.jobStats()
        except libvirt.libvirtError:
            return None
        if st.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        self.samples.append((time.monotonic() - self.t_start, st))
        return st

    def abort(self) -> None:
        """abortJob() on the source (pre-copy: the guest stays there)."""
        with contextlib.suppress(libvirt.libvirtError):
            self._poll_dom.abortJob()
            self.aborted = True

    def run(
        self,
        timeout: float,
        interval: float = 0.1,
        abort_after: float | None = None,
        on_sample=None,
    ) -> float:
        """Poll until the migrate call returns; abort once ``abort_after`` s have
        passed.  Returns ``elapsed``; raises TimeoutError after ``timeout`` s."""
        if not self.t_start:
            self.start()
        deadline = self.t_start + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            st = self.poll()
            if st is not None and on_sample is not None:
                on_sample(st)
            if (
                abort_after is not None
                and not self.aborted
                and time.monotonic() - self.t_start >= abort_after
            ):
                self.abort()
            self._thread.join(max(0.0, min(interval, deadline - time.monotonic())))
        if self._thread.is_alive():
            raise TimeoutError(f"migration of {self.name} did not return within {timeout}s")
        self.completed = self.read_completed()
        return self.elapsed

    def read_completed(self) -> dict:
        """The completed job's statistics (``downtime`` is the measured blackout)."""
        for host in (self.dst, self.src):
            conn = connect(host)
            try:
                dom = _find(conn, self.name)
                if dom is None:
                    continue
                st = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                if st and st.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                    return st
            except libvirt.libvirtError:
                continue
            finally:
                conn.close()
        return {}

    def close(self) -> None:
        for conn in (self._conn, self._poll_conn):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


# --------------------------------------------------------------------------- internals


def _check_host(host: str) -> None:
    if host not in HOSTS:
        raise ValueError(f"unknown rig host {host!r} (expected 'a' or 'b')")


def _need_libvirt() -> None:
    if libvirt is None:
        raise RuntimeError("libvirt-python is not installed (run rig/setup.sh)")


__all__ = [
    "CACHE_DIR",
    "GUEST_DIR",
    "HOSTS",
    "LABELS_NS",
    "RIG_DIR",
    "URI_A",
    "URI_B",
    "WRITER_MODES",
    "DirectMigration",
    "check_disk_image",
    "connect",
    "define_guest",
    "destroy_everywhere",
    "disk_image_path",
    "disk_lines",
    "domain_states",
    "domain_xml",
    "down",
    "file_sha256",
    "heartbeats",
    "heartbeats_continue",
    "host_dir",
    "host_socket",
    "host_uri",
    "last_heartbeat",
    "lookup",
    "make_disk_image",
    "migrate_flags",
    "migrate_params",
    "other_host",
    "parse_disk_line",
    "parse_heartbeat",
    "qemu_log",
    "refresh_pools",
    "remove_disk_image",
    "restart_host",
    "rig_available",
    "serial_log",
    "up",
    "wait_disk_sum",
    "wait_heartbeat",
    "where_active",
    "where_running",
]
