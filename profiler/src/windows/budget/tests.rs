use super::*;
use crate::record::WindowRecord;

#[test]
fn small_budgets_keep_two_significant_digits() {
    assert_eq!(percent(0.002), "0.20");
    assert_eq!(percent(0.01), "1.00");
    assert_eq!(percent(0.000_26), "0.026");
    assert_eq!(percent(0.000_012_3), "0.0012");
}

const BUDGET: OverheadBudget = OverheadBudget {
    max_fraction: 0.01,
    hit_cost: 1e-6,
    hit_cost_floor: 1e-6,
};
/// 0.1 % of a core at 1 µs a hit: a thousand hits a second.
const TIGHT_BUDGET: OverheadBudget = OverheadBudget {
    max_fraction: 0.001,
    ..BUDGET
};

#[test]
fn a_quiet_vm_is_always_probed() {
    let mut d = DutyCycle::default();
    for _ in 0..10 {
        // 1,000 hits/s × 1 µs = 0.1 % of a core.
        d.measured(&BUDGET, 1000, 1.0);
    }
    assert_eq!((d.duty(), d.block(30)), (1.0, 30));
}

#[test]
fn a_busy_vm_is_probed_a_share_of_each_window() {
    let mut d = DutyCycle::default();
    // 40,000 hits/s × 1 µs = 4 % of a core: a quarter of the time keeps 1 %.
    d.measured(&BUDGET, 40_000, 1.0);
    assert!((d.duty() - 0.25).abs() < 1e-9, "{}", d.duty());
    assert_eq!(d.block(30), 8);
    assert_eq!(d.block(4), 1);
    let cost = d.full_cost(&BUDGET).unwrap() * d.duty();
    assert!(cost <= BUDGET.max_fraction + 1e-12);
}

#[test]
fn what_links_cost_while_counting_nothing_comes_out_of_the_budget() {
    // 40,000 hits/s × 1 µs = 4 % of a core against 1 %: a quarter of the time, until the
    // closing links' runs are known (2,000 a second over a window: 0.2 % of a core);
    // then what is left (0.8 %) is what probing may spend.
    let mut d = DutyCycle::default();
    d.measured(&BUDGET, 40_000, 1.0);
    assert!((d.duty() - 0.25).abs() < 1e-9, "{}", d.duty());
    d.closing_measured(&BUDGET, 20_000, 10.0);
    assert!((d.closing_cost(&BUDGET) - 0.002).abs() < 1e-12);
    assert!((d.duty() - 0.2).abs() < 1e-9, "{}", d.duty());
    let view = d.view(&BUDGET).unwrap();
    assert!((view.closing_cost - 0.002).abs() < 1e-12, "{view:?}");
    assert!(
        describe_vm("vm", &d, &BUDGET).contains(
            "its links ran 2000.0 times/s while counting nothing (closing after a pause, \
             attaching at a resume): 0.200 % of a core"
        ),
        "{}",
        describe_vm("vm", &d, &BUDGET)
    );
    // Closing links costing the whole budget leave the floor.
    d.closing_measured(&BUDGET, 200_000, 10.0);
    d.closing_measured(&BUDGET, 200_000, 10.0);
    assert_eq!(d.duty(), MIN_DUTY);
}

#[test]
fn closing_hits_are_measured_per_window() {
    // 10-interval windows; 100 closing hits in each of window 0's intervals: its rate
    // is known when window 1 begins.
    let mut b = BudgetedVms::new(BUDGET);
    let u = TIMER_ONLY;
    assert_eq!(b.observe(1, u, 0, None, tick10(0.0)), None);
    for t in 1..=10u32 {
        let hits = Hits {
            live: u64::from(t) * 40_000,
            closing: u64::from(t) * 100,
        };
        if let Some(want) = b.observe(1, u, hits, None, tick10(f64::from(t))) {
            b.applied(1, want, f64::from(t), 0.0);
        }
    }
    let (_, d) = &b.states()[0];
    assert!((d.closing_cost(&BUDGET) - 100.0 * BUDGET.hit_cost).abs() < 1e-12);
}

#[test]
fn the_duty_follows_the_rate_and_has_a_floor() {
    let mut d = DutyCycle::default();
    d.measured(&BUDGET, 10_000_000, 1.0);
    assert_eq!(d.duty(), MIN_DUTY);
    assert_eq!(d.block(10), 1, "at least one interval per window");
    for _ in 0..20 {
        d.measured(&BUDGET, 5_000, 1.0);
    }
    assert_eq!(d.duty(), 1.0);
}

/// A window of 10 one-second intervals with a VM at 4 % of a core: probed in one block
/// of 3 at the window's start (quarter duty, rounded up); the resume takes 0.01 s; the
/// record is scaled by the time really probed.
/// A VM whose timer counts come from uprobes, and nothing else.
const TIMER_ONLY: Uprobed = Uprobed {
    timer: true,
    read_write: false,
    callbacks: false,
};

/// The sample at `t` s: 1 s refreshes, 10 s windows.
fn tick10(t: f64) -> Tick {
    Tick {
        t,
        secs: 1.0,
        window: (t / 10.0).floor() as u64,
        window_intervals: 10,
    }
}

/// VM 1 (timer probes only), first seen at 0, through intervals `1..=secs` of [`tick10`],
/// its probes hit `per_interval` times in each interval they are on; `apply` carries out a
/// change the budget asks for at `t` (false: it failed). The changes asked for, with their
/// times.
fn drive(
    b: &mut BudgetedVms,
    secs: u32,
    per_interval: u64,
    mut apply: impl FnMut(&mut BudgetedVms, f64, bool) -> bool,
) -> Vec<(f64, bool)> {
    let (mut hits, mut on) = (0u64, true);
    let mut changes = Vec::new();
    for t in 1..=secs {
        let t = f64::from(t);
        if on {
            hits += per_interval;
        }
        if let Some(want) = b.observe(1, TIMER_ONLY, hits, None, tick10(t)) {
            changes.push((t, want));
            if apply(b, t, want) {
                on = want;
            }
        }
    }
    changes
}

#[test]
fn a_window_is_probed_in_one_block_and_scaled_by_the_time_really_probed() {
    let mut b = BudgetedVms::new(BUDGET);
    assert_eq!(b.observe(1, TIMER_ONLY, 0, None, tick10(0.0)), None);
    let changes = drive(&mut b, 20, 40_000, |b, t, want| {
        b.applied(1, want, t, if want { 0.01 } else { 0.0 });
        true
    });
    // Window 0 (first seen at 0): on until the rate is known at 1, then for the rest of
    // its block of 3; window 1: on at 10 for 3 intervals, off at 13.
    assert_eq!(
        changes,
        [(3.0, false), (10.0, true), (13.0, false), (20.0, true)]
    );
    let r = stamped_window_1(&mut b, 120_000);
    // Probed from 10.01 to 13: 2.99 s; 120,000 waits counted → 401,338 in 10 s.
    assert!(r.estimated);
    assert_eq!(r.probed_seconds, Some(2.99));
    assert_eq!(r.timer, Some(401_338));
    // What the estimate added is kept for counters (serve): scaled minus counted.
    let added = |b: &BudgetedVms| b.additions();
    assert_eq!(added(&b).len(), 1);
    let (pid, exited, a) = &added(&b)[0];
    assert_eq!(
        (*pid, *exited, a.timer, a.fd_wakeups),
        (1, false, 281_338, 0)
    );
    // An exited VM's addition is handed out once more, marked, then dropped.
    b.forget(1);
    assert!(added(&b)[0].1);
    assert_eq!(added(&b)[0].2.timer, 281_338);
    b.next_sample(0.0);
    assert!(added(&b).is_empty());
}

/// VM 1's record of window 1 (10 s windows) with `timer` waits counted, as its record is
/// written with `b`'s probed time (and what scaling added given to `b`).
fn stamped_window_1(b: &mut BudgetedVms, timer: u64) -> WindowRecord {
    use crate::windows::finish::{self, WindowFacts, tests::closed_window};
    let mut closed = closed_window(1, 1, 10.0);
    closed.activity.counts.timer = Some(timer);
    closed.activity.counts.fd_wakeups = Some(0);
    let facts = WindowFacts {
        probed: b.probed(1, closed.from, closed.to),
        ..WindowFacts::default()
    };
    let (r, added) = finish::record(&closed, &facts, &finish::tests::frame(10.0));
    b.absorb(1, &added);
    r
}

#[test]
fn scaling_to_the_whole_window() {
    assert_eq!(scale(250, 2.5, 10.0), 1000);
    assert_eq!(scale(250, 10.0, 10.0), 250);
    assert_eq!(scale(250, 0.0, 10.0), 250);
    assert_eq!(scale(3, 3.0, 10.0), 10);
}

#[test]
fn the_cost_a_vm_really_pays_tightens_its_duty() {
    // The start-up says 1 µs a hit; in QEMU a hit costs 2 µs (its CPU is 1 % of a core
    // higher while probed, at 5,000 hits a second), so the duty halves once a window with
    // probed and unprobed spans has closed.
    let budget = TIGHT_BUDGET;
    let mut b = BudgetedVms::new(budget);
    let u = TIMER_ONLY;
    let (mut hits, mut cpu, mut on) = (0u64, 0.0, true);
    assert_eq!(b.observe(1, u, 0, Some(0.0), tick10(0.0)), None);
    let mut duties = Vec::new();
    for t in 1..=40u32 {
        let t = f64::from(t);
        // The guest's own 5 %, plus the probes' 1 % while they are on.
        cpu += 0.05;
        if on {
            hits += 5_000;
            cpu += 0.01;
        }
        if let Some(want) = b.observe(1, u, hits, Some(cpu), tick10(t)) {
            b.applied(1, want, t, 0.0);
            on = want;
        }
        // Before the first window closes, and at the end.
        if t == 9.0 || t == 40.0 {
            duties.push(b.duty(1));
        }
    }
    // 5,000/s × 1 µs = 0.5 % of a core against 0.1 %: a fifth, from the start-up figure;
    // then the learned 2 µs: a tenth.
    assert!((duties[0] - 0.2).abs() < 1e-9, "{duties:?}");
    assert!((duties[1] - 0.1).abs() < 0.01, "{duties:?}");
    let (_, state) = &b.states()[0];
    let learned = state.hit_cost(&budget);
    assert!((learned - 2e-6).abs() < 0.1e-6, "learned {learned}");
    // What the closing line and `serve` show: the learned cost, not the start-up one.
    let view = state.view(&budget).unwrap();
    assert!(view.learned);
    assert!((view.full_cost - 0.01).abs() < 0.001, "{view:?}");
    let line = describe_vm("noisy", state, &budget);
    assert!(
        line.starts_with("noisy: 5000 uprobe hits/s while probed")
            && line.contains("2.0")
            && line.contains("µs of its QEMU's CPU per hit (learned from its CPU time)")
            && line.contains("probed 10 % of the time"),
        "{line}"
    );
}

#[test]
fn a_learned_cost_goes_below_the_start_up_figure_but_not_the_tight_loops() {
    // Start-up: 0.5 µs in a tight loop, 2 µs after a sleep (a slowed try, say).
    let budget = OverheadBudget::new(
        0.001,
        HitCost {
            tight: 0.5e-6,
            after_sleep: 2e-6,
        },
    );
    assert_eq!(budget.hit_cost, 2e-6);
    let mut d = DutyCycle::default();
    d.measured(&budget, 1000, 1.0);
    assert!(
        (d.duty() - 0.5).abs() < 1e-9,
        "the start-up figure until learned"
    );
    assert!(
        describe_vm("vm", &d, &budget)
            .contains("2.00 µs of its QEMU's CPU per hit (the start-up measurement)")
    );
    // Its CPU time shows 1 µs a hit: 1000 hits/s cost 0.1 % of a core.
    d.calibrated(&budget, 0.021, 0.02);
    assert!((d.hit_cost(&budget) - 1e-6).abs() < 1e-12);
    assert!((d.duty() - 1.0).abs() < 1e-9, "{}", d.duty());
    assert!(d.view(&budget).unwrap().learned);
    // CPU lower while probed (the guest's own load moved): samples of 0 come down to
    // the tight-loop figure, no further.
    for _ in 0..10 {
        d.calibrated(&budget, 0.01, 0.03);
    }
    assert!(d.learned_cost().unwrap() < 0.5e-6);
    assert_eq!(d.hit_cost(&budget), 0.5e-6);
    assert!(
        describe_vm("vm", &d, &budget)
            .contains("0.50 µs of its QEMU's CPU per hit (learned from its CPU time)")
    );
}

#[test]
fn a_window_its_probes_never_saw_has_no_counts_not_zeros() {
    // Paused in window 0; every resume of window 1 failed (an attach refused):
    // its uprobe-served counts are null, not the 0 the probes counted.
    let mut b = BudgetedVms::new(TIGHT_BUDGET);
    b.observe(1, TIMER_ONLY, 0, None, tick10(0.0));
    drive(&mut b, 20, 200_000, |b, t, want| {
        let done = !(want && t < 20.0);
        if done {
            b.applied(1, want, t, 0.0);
        }
        done
    });
    let r = stamped_window_1(&mut b, 0);
    assert_eq!((r.timer, r.fd_wakeups), (None, None));
    assert!(r.estimated);
    assert_eq!(r.probed_seconds, Some(0.0));
    // The counts its probes do not serve stay as counted.
    assert_eq!(r.read, Some(0));
}

#[test]
fn a_failed_resume_moves_the_block_instead_of_losing_it() {
    // A one-interval block whose resume fails at the window's start is
    // probed one interval later, not skipped for the whole window.
    let budget = TIGHT_BUDGET;
    let mut b = BudgetedVms::new(budget);
    b.observe(1, TIMER_ONLY, 0, None, tick10(0.0));
    let changes = drive(&mut b, 12, 200_000, |b, t, want| {
        // The resume at the window's start (10) fails.
        let done = t != 10.0;
        if done {
            b.applied(1, want, t, 0.0);
        }
        done
    });
    // 200,000/s × 1 µs = 20 % against 0.1 %: the 5 % floor, one interval of ten.
    assert_eq!(
        changes,
        [(1.0, false), (10.0, true), (11.0, true), (12.0, false)]
    );
}

/// A block of one interval starts when the resume's links are in, a little after the
/// sample: its interval is probed only in part. The rate must follow such blocks too (it once
/// stayed at what whole probed intervals last showed).
#[test]
fn the_rate_follows_blocks_shorter_than_an_interval() {
    let mut b = BudgetedVms::new(TIGHT_BUDGET);
    assert_eq!(b.observe(1, TIMER_ONLY, 0, None, tick10(0.0)), None);
    let (mut hits, mut on) = (0u64, true);
    for t in 1..=100u32 {
        if on {
            // 12,000 a second for two windows (blocks of one interval), then 4,000; the
            // links count from 0.01 s after a resume.
            hits += if t <= 20 { 11_880 } else { 3_960 };
        }
        if let Some(want) = b.observe(1, TIMER_ONLY, hits, None, tick10(f64::from(t))) {
            b.applied(1, want, f64::from(t), if want { 0.01 } else { 0.0 });
            on = want;
        }
    }
    let rate = b.vms[&1].duty.rate().unwrap();
    assert!((rate - 4_000.0).abs() < 100.0, "{rate}");
}
