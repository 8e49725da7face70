//! The measured ramp: the host's busy CPU against the VMs running, fitted with a straight line
//! whose slope comes with its 95 % confidence interval, and checked against what the VMs'
//! own processes measured. A line only answers "how many VMs fit" when its slope resolves the
//! per-VM cost (its interval excludes 0) and agrees with it (holds it); otherwise the answer
//! says why and gives no VM count from the line.

use serde::Serialize;

/// Least-squares line through the host points: busy cores = base + per_vm × VMs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    pub base_cores: f64,
    pub per_vm_cores: f64,
    /// Half the 95 % confidence interval of `per_vm_cores` (Student's t, n − 2 degrees of
    /// freedom); infinite with two windows.
    pub per_vm_ci95: f64,
    /// How far the windows scatter around the line: the residuals' standard deviation, cores.
    pub noise_cores: f64,
    /// Coefficient of determination, 1 = perfectly linear.
    pub r_squared: f64,
    /// Windows fitted.
    pub windows: usize,
    /// Σ (VMs − mean VMs)²: how much the ramp varies the VM count (the slope's error is the
    /// noise over its square root).
    pub spread: f64,
}

/// Fits busy cores = a + b × VMs; `None` with fewer than two distinct VM counts.
pub fn fit(points: &[(u32, f64)]) -> Option<Fit> {
    let n = points.len() as f64;
    let distinct: std::collections::BTreeSet<u32> = points.iter().map(|p| p.0).collect();
    if distinct.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 as f64 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 as f64 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let ss_tot: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - (a + b * p.0 as f64)).powi(2))
        .sum();
    let dof = points.len().saturating_sub(2);
    let noise = if dof > 0 {
        (ss_res / dof as f64).sqrt()
    } else {
        f64::INFINITY
    };
    Some(Fit {
        base_cores: a,
        per_vm_cores: b,
        per_vm_ci95: t975(dof) * noise / sxx.sqrt(),
        noise_cores: noise,
        r_squared: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            1.0
        },
        windows: points.len(),
        spread: sxx,
    })
}

/// Student's t at 97.5 % (two-sided 95 %) for `dof` degrees of freedom (a table; between its
/// rows the next smaller row, which errs wide).
pub fn t975(dof: usize) -> f64 {
    const TABLE: [(usize, f64); 19] = [
        (1, 12.706),
        (2, 4.303),
        (3, 3.182),
        (4, 2.776),
        (5, 2.571),
        (6, 2.447),
        (7, 2.365),
        (8, 2.306),
        (9, 2.262),
        (10, 2.228),
        (12, 2.179),
        (15, 2.131),
        (20, 2.086),
        (25, 2.060),
        (30, 2.042),
        (40, 2.021),
        (60, 2.000),
        (120, 1.980),
        (usize::MAX, 1.960),
    ];
    if dof == 0 {
        return f64::INFINITY;
    }
    TABLE
        .iter()
        .rev()
        .find(|(d, _)| *d <= dof)
        .map_or(TABLE[0].1, |(_, t)| *t)
}

/// What the ramp says of the per-VM cost the VMs' processes measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum RampVerdict {
    /// The slope holds the per-VM cost: the line may project.
    Agrees {
        /// VMs at the CPU budget by the line, and by the ends of its slope's interval.
        vms: Option<u64>,
        range: Option<(u64, u64)>,
    },
    /// The slope's interval includes 0, or is wider than half the slope: the host's noise
    /// hides what one VM adds.
    Unresolved {
        /// The Σ (VMs − mean)² the ramp would need for its interval to be half the per-VM
        /// cost, at this noise (more VMs, or more windows at each count).
        spread_needed: f64,
    },
    /// The slope is resolved but its interval misses the per-VM cost.
    Disagrees,
}

/// The ramp checked against the VMs' own cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RampCheck {
    pub fit: Fit,
    /// The same line through the VMs' own CPU in the same windows: what their processes add
    /// per VM, measured as the host's slope is.
    pub own_fit: Option<Fit>,
    /// The median VM's own CPU, cores (its QEMU process).
    pub per_vm_cost_cores: f64,
    /// Half the 95 % interval of the VMs' mean cost (their spread over √n; 0 for one VM).
    pub per_vm_cost_ci95: f64,
    #[serde(flatten)]
    pub verdict: RampVerdict,
    /// Why, in a sentence for people.
    pub why: String,
}

/// The median of `costs` (cores per VM) and half the 95 % interval of their mean.
pub fn per_vm_cost(costs: &[f64]) -> (f64, f64) {
    let mut v = costs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    if n < 2 {
        return (median, 0.0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let sd = (v.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    (median, t975(n - 1) * sd / (n as f64).sqrt())
}

/// Checks the host's line `fit` for a CPU budget of `budget` cores. It resolves the per-VM
/// cost when its slope's 95 % interval excludes 0 and is within half the slope either side.
/// Then it is compared with what the VMs' own processes add per VM in the same windows
/// (`own_fit`'s slope; where that line cannot be drawn, their median cost `per_vm` ± its
/// interval): the two agree when their intervals, combined (the root of their squares), hold
/// the difference. The median cost is also set against that slope: a VM's own cost that moves
/// with the number running (on this project's machine it falls: waking a thread from an idle
/// CPU costs it more than from a busy one) makes a figure measured with few VMs a poor one
/// for many, and the text says so.
pub fn check(fit: Fit, own_fit: Option<Fit>, per_vm: (f64, f64), budget: f64) -> RampCheck {
    let (per_vm, per_vm_ci95) = per_vm;
    let (lo, hi) = (
        fit.per_vm_cores - fit.per_vm_ci95,
        fit.per_vm_cores + fit.per_vm_ci95,
    );
    let count = |slope: f64| {
        (slope > 0.0).then(|| ((budget - fit.base_cores) / slope).floor().max(0.0) as u64)
    };
    let resolved =
        fit.per_vm_ci95.is_finite() && lo > 0.0 && fit.per_vm_ci95 <= 0.5 * fit.per_vm_cores;
    // What the VMs' processes add per VM, measured as the host's slope is.
    let own = own_fit.filter(|f| f.per_vm_ci95.is_finite()).map_or(
        (per_vm, per_vm_ci95, "their median cost"),
        |f| {
            (
                f.per_vm_cores,
                f.per_vm_ci95,
                "what their processes add per VM",
            )
        },
    );
    let agree = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0).abs() <= a.1.hypot(b.1);
    let (verdict, mut why) = if !resolved {
        // Half the per-VM cost as the interval's half width: t·noise/√spread = cost/2.
        let t = t975(fit.windows.saturating_sub(2).max(1));
        let spread_needed = if per_vm > 0.0 && fit.noise_cores.is_finite() {
            (2.0 * t * fit.noise_cores / per_vm).powi(2)
        } else {
            f64::INFINITY
        };
        let why = format!(
            "the ramp does not resolve the per-VM cost: the host's busy CPU scatters by {:.3} \
             cores around the line (its noise), and one VM adds {:.4} cores by its own measure; \
             the slope's 95 % interval {:.4} to {:.4} {}. Resolving it needs Σ(VMs − mean)² ≈ \
             {:.0} (this ramp: {:.0}): more VMs, or more windows at each count",
            fit.noise_cores,
            per_vm,
            lo,
            hi,
            if lo <= 0.0 {
                "includes 0"
            } else {
                "is wider than half the slope"
            },
            spread_needed,
            fit.spread
        );
        (RampVerdict::Unresolved { spread_needed }, why)
    } else if agree((fit.per_vm_cores, fit.per_vm_ci95), (own.0, own.1)) {
        let why = format!(
            "the slope {:.4} ± {:.4} cores per VM agrees with {} in the same windows, {:.4} ± \
             {:.4} (95 % intervals): the host pays what their processes use",
            fit.per_vm_cores, fit.per_vm_ci95, own.2, own.0, own.1
        );
        let range = count(hi).zip(count(lo));
        (
            RampVerdict::Agrees {
                vms: count(fit.per_vm_cores),
                range,
            },
            why,
        )
    } else {
        let above = own.0 > fit.per_vm_cores;
        let why = format!(
            "the slope {:.4} ± {:.4} cores per VM differs from {} in the same windows, {:.4} \
             ± {:.4} (95 % intervals): the host pays {} per VM than their processes use ({})",
            fit.per_vm_cores,
            fit.per_vm_ci95,
            own.2,
            own.0,
            own.1,
            if above { "less" } else { "more" },
            if above {
                "other load on the host fell while VMs were added"
            } else {
                "kernel threads, interrupts and timers on their behalf, or other load that \
                 rose while VMs were added"
            },
        );
        (RampVerdict::Disagrees, why)
    };
    if resolved
        && own_fit.is_some()
        && !agree((fit.per_vm_cores, fit.per_vm_ci95), (per_vm, per_vm_ci95))
    {
        why.push_str(&format!(
            "; the VMs' median cost, {per_vm:.4} ± {per_vm_ci95:.4}, is not what one more VM \
             adds: each VM's own cost {} as VMs were added, so a projection from it {} how \
             many fit",
            if per_vm > fit.per_vm_cores {
                "fell"
            } else {
                "rose"
            },
            if per_vm > fit.per_vm_cores {
                "understates"
            } else {
                "overstates"
            }
        ));
    }
    RampCheck {
        fit,
        own_fit,
        per_vm_cost_cores: per_vm,
        per_vm_cost_ci95: per_vm_ci95,
        verdict,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in −1..1.
    fn noise(i: usize) -> f64 {
        let h = (i as u64).wrapping_mul(2_654_435_761) % 1000;
        h as f64 / 500.0 - 1.0
    }

    /// `windows` windows at each of `counts` VM counts (0, 1, ...): `base + slope` cores per
    /// VM, plus up to `noise` either way.
    fn ramp(counts: usize, windows: usize, base: f64, slope: f64, noise: f64) -> Vec<(u32, f64)> {
        (0..counts * windows)
            .map(|i| {
                let vms = (i / windows) as u32;
                (vms, base + slope * vms as f64 + noise * self::noise(i))
            })
            .collect()
    }

    #[test]
    fn a_clean_ramp_agrees_and_counts_vms_with_a_range() {
        // 0.03 cores per VM, 0.2 base, little noise, 0..=6 VMs, 3 windows each.
        let points = ramp(7, 3, 0.2, 0.03, 0.002);
        let f = fit(&points).unwrap();
        assert!((f.per_vm_cores - 0.03).abs() < 0.002, "{f:?}");
        assert!(f.per_vm_ci95 > 0.0 && f.per_vm_ci95 < 0.005, "{f:?}");
        let c = check(f, None, (0.0305, 0.0005), 1.6);
        let RampVerdict::Agrees {
            vms: Some(vms),
            range: Some((lo, hi)),
        } = c.verdict
        else {
            panic!("{c:?}")
        };
        assert!((44..=50).contains(&vms), "{vms}");
        assert!(lo <= vms && vms <= hi, "{lo} {vms} {hi}");
    }

    /// Today's quiet ramp: 0.5 % of a core per VM on a host whose noise is several times that.
    #[test]
    fn a_noisy_host_does_not_resolve_a_small_per_vm_cost() {
        let points = ramp(8, 2, 0.036, 0.005, 0.05);
        let f = fit(&points).unwrap();
        let c = check(f, None, (0.0049, 0.0002), 1.6);
        let RampVerdict::Unresolved { spread_needed } = c.verdict else {
            panic!("{c:?}")
        };
        assert!(spread_needed > f.spread, "{c:?}");
        assert!(c.why.contains("wider than half the slope"), "{}", c.why);
        // Noisier still: the interval includes 0.
        let noisier: Vec<(u32, f64)> = (0..16)
            .map(|i| {
                (
                    (i / 2) as u32,
                    0.036 + 0.005 * (i / 2) as f64 + 0.2 * noise(i),
                )
            })
            .collect();
        let c = check(fit(&noisier).unwrap(), None, (0.0049, 0.0002), 1.6);
        assert!(c.why.contains("includes 0"), "{}", c.why);
    }

    #[test]
    fn a_resolved_slope_far_from_the_vms_cost_disagrees() {
        let points = ramp(6, 2, 0.1, 0.0077, 0.0005);
        let c = check(fit(&points).unwrap(), None, (0.0205, 0.001), 1.6);
        assert_eq!(c.verdict, RampVerdict::Disagrees, "{c:?}");
        assert!(c.why.contains("differs"), "{}", c.why);
    }

    /// This project's noisy ramp: each VM's own cost fell as VMs were added (4.3 % alone,
    /// 3.2 % with six); the host's slope agrees with what their processes add per VM, and the
    /// text says the median figure overstates an added VM's cost.
    #[test]
    fn a_per_vm_cost_that_falls_with_density_is_said() {
        let points = |own: bool| -> Vec<(u32, f64)> {
            (0..14)
                .map(|i| {
                    let vms = (i / 2 + 1) as u32;
                    let vm = 0.0283 * f64::from(vms) + 0.015 + 0.0008 * noise(i);
                    (
                        vms,
                        if own {
                            vm
                        } else {
                            vm + 0.012 + 0.0008 * noise(i + 7)
                        },
                    )
                })
                .collect()
        };
        let c = check(
            fit(&points(false)).unwrap(),
            fit(&points(true)),
            (0.0325, 0.0017),
            1.6,
        );
        assert!(matches!(c.verdict, RampVerdict::Agrees { .. }), "{c:?}");
        assert!(
            c.why.contains("what their processes add per VM"),
            "{}",
            c.why
        );
        assert!(c.why.contains("fell as VMs were added"), "{}", c.why);
        assert!(c.why.contains("understates how many fit"), "{}", c.why);
    }

    #[test]
    fn the_vms_own_cost_with_its_interval() {
        let (median, ci) = per_vm_cost(&[0.031, 0.0284, 0.028, 0.0287, 0.028, 0.0255]);
        assert!((median - 0.0282).abs() < 1e-9);
        assert!(ci > 0.001 && ci < 0.003, "{ci}");
        assert_eq!(per_vm_cost(&[0.02]), (0.02, 0.0));
        assert_eq!(per_vm_cost(&[]), (0.0, 0.0));
    }

    #[test]
    fn t_quantiles() {
        assert_eq!(t975(0), f64::INFINITY);
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(11), 2.228, "between rows: the smaller row's, wider");
        assert_eq!(t975(1000), 1.980);
        // Two windows: a line through both, no interval.
        let f = fit(&[(1, 0.5), (2, 0.6)]).unwrap();
        assert!(!f.per_vm_ci95.is_finite());
        assert!(matches!(
            check(f, None, (0.1, 0.0), 1.0).verdict,
            RampVerdict::Unresolved { .. }
        ));
        assert!(fit(&[(1, 0.5), (1, 0.6)]).is_none());
    }
}
