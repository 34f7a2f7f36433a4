#!/usr/bin/env python3
"""Smoke test of the two-host rig, with libvirt-python directly (no lmwatch).

  1. boot an idle guest and a self-test guest on host a (boot time)
  2. migrate the idle guest a -> b (LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE) in a
     thread while polling jobStats; check it runs on b, heartbeats go on, bad=0
  3. the self-test guest flips one bit: its heartbeat must show bad>0
  4. a guest rewriting 32 MiB at 40 MiB/s, link capped at 16 MiB/s: check it does not
     converge, force it with suspend(); check it runs on b with bad=0

Run after rig/setup.sh and rig/up.sh, as root:  python3 rig/smoke.py [--keep]
Exits non-zero on any failure.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextlib

import libvirt
import rigctl

# libvirt prints every error to stderr by default; the script reports failures itself
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

T0 = time.monotonic()
SELFTEST_AT = 25  # guest seconds after which the self-test guest flips one bit
TIMINGS = {}


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)
    log("ok: " + msg)


def mib(b):
    return f"{(b or 0) / 1048576:.1f}"


class Migration:
    """migrateToURI3 in a thread; jobStats polled from a separate connection."""

    def __init__(self, name, src, dst, flags=None, params=None):
        self.name, self.src, self.dst = name, src, dst
        self.flags = flags if flags is not None else rigctl.migrate_flags()
        self.params = params if params is not None else rigctl.migrate_params()
        self.error = None
        self.samples = []
        self.conn = rigctl.connect(src)
        self.dom = self.conn.lookupByName(name)
        self.poll_conn = rigctl.connect(src)
        self.poll_dom = self.poll_conn.lookupByName(name)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.dom.migrateToURI3(rigctl.host_uri(self.dst), self.params, self.flags)
        except libvirt.libvirtError as e:
            self.error = e
        self.t_end = time.monotonic()

    def start(self):
        self.t_start = time.monotonic()
        self.thread.start()

    def poll(self):
        try:
            st = self.poll_dom.jobStats()
        except libvirt.libvirtError:
            return None
        if st.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        self.samples.append((time.monotonic() - self.t_start, st))
        return st

    def wait(self, timeout, on_sample=None, interval=0.1):
        deadline = time.monotonic() + timeout
        last_print = 0.0
        while self.thread.is_alive() and time.monotonic() < deadline:
            st = self.poll()
            if st and time.monotonic() - last_print >= 1.0:
                last_print = time.monotonic()
                pg = st.get("memory_page_size", 4096)
                log(
                    f"  job t={st.get('time_elapsed', 0) / 1000:.1f}s iter={st.get('memory_iteration')} "
                    f"remaining={mib(st.get('memory_remaining'))}MiB bps={mib(st.get('memory_bps'))}MiB/s "
                    f"dirty={mib(st.get('memory_dirty_rate', 0) * pg)}MiB/s "
                    f"expected_downtime={st.get('downtime')}ms"
                )
            if st and on_sample:
                on_sample(st)
            time.sleep(interval)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            raise Failure(f"migration of {self.name} did not return within {timeout}s")
        return time.monotonic() - self.t_start


def completed_stats(name, host):
    conn = rigctl.connect(host)
    try:
        return conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as e:
        log(f"  (no completed stats on {host}: {e.get_error_message()})")
        return {}
    finally:
        conn.close()


def boot(names_args):
    t = time.monotonic()
    for name, kw in names_args:
        rigctl.define_guest("a", name, **kw)
    boots = {}
    for name, _ in names_args:
        hb = rigctl.wait_heartbeat(name, timeout=90)
        boots[name] = time.monotonic() - t
        log(f"{name} booted on a in {boots[name]:.1f}s: {hb}")
    return boots


def after_migration(name, dst, elapsed, label):
    check(rigctl.where_running(name) == [dst], f"{name} runs on {dst} only (after {label})")
    st = rigctl.domain_states(name)
    src = rigctl.other_host(dst)
    log(f"  states: {st}  ({src}: undefined expected with UNDEFINE_SOURCE)")
    check(st[src] is None, f"{name} is no longer defined on {src}")
    conn = rigctl.connect(dst)
    try:
        check(conn.lookupByName(name).isPersistent() == 1, f"{name} is persistent on {dst}")
    finally:
        conn.close()
    comp = completed_stats(name, dst)
    if comp:
        log(
            f"  completed stats on {dst}: time_elapsed={comp.get('time_elapsed')}ms "
            f"downtime={comp.get('downtime')}ms downtime_net={comp.get('downtime_net')}ms "
            f"iterations={comp.get('memory_iteration')} total={mib(comp.get('data_processed'))}MiB"
        )
    hb0 = rigctl.wait_heartbeat(name, timeout=20, host=dst)
    src_beats, dst_beats = rigctl.heartbeats(name, src), rigctl.heartbeats(name, dst)
    check(
        bool(src_beats) and bool(dst_beats) and dst_beats[0]["n"] == src_beats[-1]["n"] + 1,
        f"heartbeat counter continues across hosts: last on {src} n={src_beats[-1]['n'] if src_beats else None}, "
        f"first on {dst} n={dst_beats[0]['n'] if dst_beats else None}",
    )
    check(rigctl.heartbeats_continue(name, 4), f"{name} heartbeats continue on {dst}")
    hb = rigctl.last_heartbeat(name)
    check(
        hb["host"] == dst and hb["n"] > hb0["n"] - 1,
        f"{name} heartbeat read from {dst}'s serial log: {hb}",
    )
    check(hb["bad"] == 0, f"{name} memory intact after migration (bad=0)")
    TIMINGS[f"{label}: migration"] = elapsed
    if comp.get("downtime") is not None:
        TIMINGS[f"{label}: blackout (completed downtime, s)"] = comp["downtime"] / 1000


def main():
    keep = "--keep" in sys.argv
    ok, why = rigctl.rig_available()
    if not ok:
        print(f"rig not available: {why}", file=sys.stderr)
        return 2
    names = ["smoke-idle", "smoke-selftest", "smoke-busy"]
    try:
        # ---- 1. boot idle + self-test guests
        boots = boot(
            [
                ("smoke-idle", dict(write_mib=16)),
                ("smoke-selftest", dict(write_mib=16, selftest=SELFTEST_AT)),
            ]
        )
        TIMINGS["boot (two guests at once)"] = max(boots.values())

        # ---- 2. idle migration a -> b
        log("migrating smoke-idle a -> b (idle)")
        m = Migration("smoke-idle", "a", "b")
        m.start()
        elapsed = m.wait(120)
        check(m.error is None, f"idle migration succeeded in {elapsed:.1f}s ({m.error})")
        check(
            len(m.samples) > 0 and "time_elapsed" in m.samples[-1][1],
            f"jobStats sampled during the job ({len(m.samples)} samples)",
        )
        log(f"  jobStats keys: {sorted(m.samples[-1][1])}")
        after_migration("smoke-idle", "b", elapsed, "idle")

        # ---- 3. self-test guest: migrate it too (before its flip), then the flipped
        #         bit must show as bad>0 in the destination's serial log
        log("migrating smoke-selftest a -> b (idle, before its bit flip)")
        m = Migration("smoke-selftest", "a", "b")
        m.start()
        elapsed = m.wait(120)
        check(m.error is None, f"self-test guest migration succeeded in {elapsed:.1f}s ({m.error})")
        hb = rigctl.wait_heartbeat("smoke-selftest", timeout=10, host="b")
        check(
            hb["bad"] == 0 and hb["n"] < SELFTEST_AT,
            f"self-test guest on b before the flip (n={hb['n']} < {SELFTEST_AT}), bad=0",
        )
        t = time.monotonic()
        while time.monotonic() - t < SELFTEST_AT + 10:
            hb = rigctl.last_heartbeat("smoke-selftest")
            if hb and hb["bad"] > 0:
                break
            time.sleep(0.5)
        check(
            hb is not None and hb["bad"] > 0 and hb["host"] == "b",
            f"self-test corruption detected on the destination: {hb}",
        )
        for n in ("smoke-idle", "smoke-selftest"):
            rigctl.destroy_everywhere(n)

        # ---- 4. busy guest, capped link: no convergence, forced by pause
        boots = boot([("smoke-busy", dict(write_mib=32, rate_mib=40))])
        TIMINGS["boot (one busy guest)"] = boots["smoke-busy"]
        time.sleep(2)
        hb = rigctl.last_heartbeat("smoke-busy")
        check(hb["w"] > 0 and hb["bad"] == 0, f"busy guest writes: {hb}")
        conn = rigctl.connect("a")
        dom = conn.lookupByName("smoke-busy")
        dom.migrateSetMaxSpeed(16, 0)
        log(f"busy migration a -> b, max speed {dom.migrateGetMaxSpeed(0)} MiB/s")
        m = Migration("smoke-busy", "a", "b")
        m.start()
        state = {"paused": False, "t_pause": None, "rem_at_pause": None}

        def on_sample(st):
            if state["paused"]:
                return
            if st.get("memory_iteration", 0) >= 6 or time.monotonic() - m.t_start > 40:
                state["rem_at_pause"] = st.get("memory_remaining")
                state["iter_at_pause"] = st.get("memory_iteration")
                log(
                    f"  not converged after {st.get('memory_iteration')} passes "
                    f"({mib(st.get('memory_remaining'))} MiB left): suspend()"
                )
                state["t_pause"] = time.monotonic()
                dom.suspend()
                state["paused"] = True

        elapsed = m.wait(180, on_sample)
        check(m.error is None, f"busy migration succeeded in {elapsed:.1f}s ({m.error})")
        check(state["paused"], "busy migration had to be forced by a pause")
        check(
            (state["rem_at_pause"] or 0) > 2 * 1048576,
            f"it was not converging: {mib(state['rem_at_pause'])} MiB left after "
            f"{state.get('iter_at_pause')} passes",
        )
        TIMINGS["busy: pause -> migration done"] = m.t_end - state["t_pause"]
        after_migration("smoke-busy", "b", elapsed, "busy")
        conn.close()
    except Failure as e:
        log(f"FAILED: {e}")
        return 1
    except Exception as e:
        log(f"FAILED with {type(e).__name__}: {e}")
        return 1
    finally:
        if not keep:
            for n in names:
                with contextlib.suppress(Exception):
                    rigctl.destroy_everywhere(n)
    log("timings:")
    for k, v in TIMINGS.items():
        log(f"  {k}: {v:.2f}s")
    log(f"smoke PASSED in {time.monotonic() - T0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
