"""The re-implemented baselines follow their systems' schedules on synthetic sample streams."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from lmwatch.bench.baselines import (
    BASELINES,
    HYPERVISOR_DEFAULT_BUDGET,
    KubeVirt,
    KubeVirtConfig,
    Nova,
    NovaConfig,
    OVirt,
    Proxmox,
    VirshTimeout,
    kubevirt_data_size,
    nova_data_gb,
    nova_downtime_steps,
)
from lmwatch.bench.controller import (
    Cancel,
    Command,
    Controller,
    Handover,
    Pause,
    SetBudget,
    Setting,
)
from lmwatch.bench.corpus import Workload, workload_from_mapping
from lmwatch.bench.runner import run
from lmwatch.model import GIB, Phase, Sample
from lmwatch.profiles.schema import Profile

MEMORY = 4 * GIB
BANDWIDTH = 1e9
PROFILE = Profile(name="p")
NEUTRAL = re.compile(
    r"post.?copy|suspend|downtime|auto.?converge|xbzrle|libvirt|qemu|virDomain", re.IGNORECASE
)


def setting(memory: int = MEMORY) -> Setting:
    return Setting(
        workload="w",
        memory=memory,
        bandwidth=BANDWIDTH,
        change_rate=None,
        profile=PROFILE,
        switchover=0.05,
    )


def sample(t: float, remaining: float, passes: int = 1, transferred: float = 0.0) -> Sample:
    return Sample(
        time=t,
        memory_total=MEMORY,
        memory_remaining=round(remaining),
        memory_transferred=round(transferred),
        transfer_rate=BANDWIDTH,
        change_rate=0.0,
        passes=passes,
        phase=Phase.COPYING,
    )


Stream = Callable[[float], Sample]


def sawtooth(t: float) -> Sample:
    """Passes of 5 s: the remaining falls within each pass and jumps up at the next."""
    passes = 1 + int(t // 5)
    return sample(t, 1e9 - 1e8 * (t % 5), passes, transferred=1e9 * t)


def drive(controller: Controller, stream: Stream, until: float) -> list[tuple[float, Command]]:
    """Feed one sample per poll interval up to `until`; the commands with their times."""
    out: list[tuple[float, Command]] = []
    k = 1
    while True:
        now = round(k * controller.poll_interval, 9)
        if now > until:
            return out
        out.extend((now, command) for command in controller.step(stream(now), now))
        k += 1


def times(commands: list[tuple[float, Command]], kind: type) -> list[float]:
    return [t for t, command in commands if isinstance(command, kind)]


def budgets(commands: list[tuple[float, Command]]) -> list[tuple[float, float]]:
    return [(t, c.seconds) for t, c in commands if isinstance(c, SetBudget)]


# ------------------------------------------------------------------------------- Nova


def test_nova_downtime_steps_follow_the_linear_schedule() -> None:
    assert nova_data_gb(MEMORY) == 4.0
    assert nova_data_gb(GIB) == 2.0  # below 2 GiB counts as 2
    steps = nova_downtime_steps(4.0)
    assert steps[0] == (0, 50)
    assert steps[1] == (300, 95)  # 75 s per GiB, +45 ms
    assert steps[-1] == (3000, 500)
    assert len(steps) == 11
    assert [ms for _, ms in steps] == [int(50 + 45 * i) for i in range(11)]


def test_nova_raises_the_budget_on_time_and_aborts_at_800s_per_gib() -> None:
    nova = Nova(setting())
    plan = nova.start()
    assert plan.blackout_budget == HYPERVISOR_DEFAULT_BUDGET
    assert not plan.arm_handover and not plan.arm_slow_down
    commands = drive(nova, sawtooth, 3300)
    expected = [(0.5, 0.05)] + [(300.0 * i + 0.5, (50 + 45 * i) / 1000) for i in range(1, 11)]
    assert [(t, round(s, 3)) for t, s in budgets(commands)] == expected
    assert times(commands, Cancel) == [3200.5]  # first poll past 800 s × 4 GiB, once
    assert times(commands, Pause) == [] and times(commands, Handover) == []


def test_nova_force_complete_pauses_one_poll_after_the_timeout() -> None:
    nova = BASELINES["nova+pause"](setting())
    assert nova.name == "nova+pause"
    commands = drive(nova, sawtooth, 3300)
    assert times(commands, Pause) == [3201.0]
    assert times(commands, Cancel) == []


def test_nova_with_post_copy_arms_it_and_hands_over_at_the_timeout() -> None:
    nova = BASELINES["nova+handover"](setting())
    plan = nova.start()
    assert plan.arm_handover and not plan.arm_slow_down
    commands = drive(nova, sawtooth, 3300)
    assert times(commands, Handover) == [3201.0]
    assert times(commands, Pause) == [] and times(commands, Cancel) == []


def test_nova_small_instances_count_as_two_gib() -> None:
    nova = Nova(setting(memory=GIB // 2), NovaConfig())
    commands = drive(nova, sawtooth, 1700)
    assert times(commands, Cancel) == [1600.5]
    assert budgets(commands)[1][0] == 150.5


# --------------------------------------------------------------------------- KubeVirt


def test_kubevirt_completion_time_counts_decimal_gigabytes_rounded_up() -> None:
    assert kubevirt_data_size(MEMORY) == 5  # 4.29 GB
    assert kubevirt_data_size(10**9) == 1
    assert KubeVirt(setting()).acceptable == 750


def test_kubevirt_aborts_after_150s_without_progress() -> None:
    def stuck(t: float) -> Sample:
        return sample(t, 1e9 - 1e7 * min(t, 20.0), transferred=1e9 * t)

    kubevirt = KubeVirt(setting())
    plan = kubevirt.start()
    assert plan.blackout_budget == HYPERVISOR_DEFAULT_BUDGET
    assert not plan.arm_handover and not plan.arm_slow_down
    commands = drive(kubevirt, stuck, 400)
    [cancel] = times(commands, Cancel)
    assert 20.0 + 151 <= cancel < 20.0 + 151 + 0.4 + 1e-9  # whole seconds > 150
    assert len(commands) == 1


def test_kubevirt_aborts_at_its_completion_timeout_when_progressing() -> None:
    commands = drive(KubeVirt(setting()), sawtooth, 800)
    assert times(commands, Cancel) == [751.2]  # first poll with whole seconds > 750
    assert len(commands) == 1


def test_kubevirt_with_post_copy_hands_over_at_the_timeout_instead() -> None:
    kubevirt = BASELINES["kubevirt+handover"](setting())
    assert kubevirt.start().arm_handover
    commands = drive(kubevirt, sawtooth, 2000)
    assert times(commands, Handover) == [751.2]
    assert times(commands, Cancel) == []


def test_kubevirt_with_post_copy_still_aborts_a_stall_before_the_timeout() -> None:
    def stuck(t: float) -> Sample:
        return sample(t, 5e8, transferred=1e9)

    commands = drive(KubeVirt(setting(), KubeVirtConfig(allow_post_copy=True)), stuck, 400)
    assert len(times(commands, Cancel)) == 1
    assert times(commands, Handover) == []


def test_kubevirt_disruption_without_post_copy_pauses_then_doubles_the_time() -> None:
    kubevirt = BASELINES["kubevirt+pause"](setting())
    assert not kubevirt.start().arm_handover
    commands = drive(kubevirt, sawtooth, 1600)
    assert times(commands, Pause) == [751.2]
    assert times(commands, Cancel) == [1501.2]


def test_kubevirt_slow_arms_slowing_with_hypervisor_defaults() -> None:
    plan = BASELINES["kubevirt+slow"](setting()).start()
    assert plan.arm_slow_down and not plan.arm_handover
    assert (plan.slow_down_initial, plan.slow_down_step) == (0.2, 0.1)


# ------------------------------------------------------------------------------ oVirt


def test_ovirt_minimal_downtime_steps_per_new_pass_then_aborts() -> None:
    ovirt = OVirt(setting())
    plan = ovirt.start()
    assert plan.blackout_budget == 0.1
    assert plan.arm_slow_down and not plan.arm_handover
    assert plan.bandwidth == BANDWIDTH / 2  # AUTO limit shared by maxMigrations = 2
    commands = drive(ovirt, sawtooth, 200)
    # first wake (10 s) sees pass 3; stalling = passes since: 2, 4, 6, 8, 10, 12 ...
    assert [(t, round(s, 3)) for t, s in budgets(commands)] == [
        (20.0, 0.15),
        (30.0, 0.2),
        (40.0, 0.3),
        (50.0, 0.4),
        (60.0, 0.5),
    ]
    assert times(commands, Cancel) == [70.0]
    assert len(commands) == 6  # the monitor stops after aborting


def test_ovirt_does_nothing_while_the_pass_does_not_change() -> None:
    def one_long_pass(t: float) -> Sample:
        return sample(t, max(0.0, 4e9 - 1e6 * t), passes=1, transferred=1e6 * t)

    assert drive(OVirt(setting()), one_long_pass, 500) == []


def test_ovirt_post_copy_policy_hands_over_after_two_steps() -> None:
    ovirt = BASELINES["ovirt+handover"](setting())
    assert ovirt.start().arm_handover
    commands = drive(ovirt, sawtooth, 200)
    assert budgets(commands) == [(20.0, 0.15), (30.0, 0.2)]
    assert times(commands, Handover) == [40.0]
    assert times(commands, Cancel) == []


def test_ovirt_suspend_policy_ends_with_a_long_budget_then_aborts() -> None:
    ovirt = BASELINES["ovirt+5s"](setting())
    assert ovirt.start().bandwidth is None  # maxMigrations = 1: the whole link
    commands = drive(ovirt, sawtooth, 200)
    assert budgets(commands)[-1] == (70.0, 5.0)
    assert times(commands, Cancel) == [80.0]


# ---------------------------------------------------------------------------- Proxmox


def test_proxmox_doubles_the_budget_after_six_growing_remainders() -> None:
    proxmox = Proxmox(setting())
    plan = proxmox.start()
    assert plan.arm_slow_down and not plan.arm_handover
    assert plan.blackout_budget == 0.1

    def passes_of_3s(t: float) -> Sample:
        return sample(t, 2e9 - 5e8 * (t % 3), 1 + int(t // 3), transferred=1e9 * t)

    commands = drive(proxmox, passes_of_3s, 40)
    # it wakes every second; the remaining grows at 3, 6, ..., 18 s: the sixth is > 5
    assert budgets(commands) == [(18.0, 0.2), (36.0, 0.4)]
    assert all(abs(t - round(t)) < 1e-9 for t, _ in commands)  # only on its 1 s wakes


def test_proxmox_polls_faster_once_little_is_left() -> None:
    proxmox = Proxmox(setting())

    def nearly_done(t: float) -> Sample:
        return sample(t, 1e6, transferred=1e9 * t)  # 1 MB left, 1 GB moved per second

    drive(proxmox, nearly_done, 3)
    assert proxmox.sleep == 0.1


# ------------------------------------------------------------------------------ virsh


def test_virsh_pauses_once_after_its_timeout() -> None:
    virsh = BASELINES["virsh-300+pause"](setting())
    plan = virsh.start()
    assert plan.blackout_budget == HYPERVISOR_DEFAULT_BUDGET and not plan.arm_handover
    commands = drive(virsh, sawtooth, 400)
    assert times(commands, Pause) == [300.5]
    assert len(commands) == 1


def test_virsh_post_copy_variant_arms_and_hands_over() -> None:
    virsh = VirshTimeout(setting(), 300.0, "postcopy", "virsh-300+handover")
    assert virsh.start().arm_handover
    commands = drive(virsh, sawtooth, 400)
    assert times(commands, Handover) == [300.5]


# ---------------------------------------------------------------------------- registry


def test_every_baseline_has_a_neutral_name_and_builds() -> None:
    assert {
        "nova",
        "nova+pause",
        "nova+handover",
        "kubevirt",
        "kubevirt+handover",
        "kubevirt+slow",
        "ovirt",
        "proxmox",
        "virsh-300+pause",
        "virsh-300+handover",
    } <= set(BASELINES)
    for name, factory in BASELINES.items():
        assert not NEUTRAL.search(name), name
        controller = factory(setting())
        assert controller.name == name
        assert controller.poll_interval > 0
        plan = controller.start()
        assert 0 < plan.blackout_budget <= 2000


def quiet_workload() -> Workload:
    return workload_from_mapping(
        {
            "name": "quiet",
            "memory": "1GiB",
            "working_set": "64MiB",
            "change_rate": "20MiB/s",
            "bandwidth": "10Gbit/s",
        }
    )


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_completes_a_quiet_workload(name: str) -> None:
    result = run(quiet_workload(), PROFILE, BASELINES[name])
    assert result.outcome == "completed"
    assert result.controller == name
