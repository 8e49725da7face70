//! Charts for reports: events per window per VM (`report --plot`), before vs after
//! (`compare --plot`), host CPU against VM count with the projection (`capacity --plot`).
//!
//! Drawn with plotters into SVG, which needs no fonts (the viewer renders the text); PNG is
//! rendered from that SVG with resvg and the system's fonts, where there are some.

use std::path::Path;

use anyhow::{Context as _, bail};
use plotters::{coord::Shift, prelude::*};

use crate::text::clean;
use crate::{
    analysis::{capacity::CapacityReport, compare::Comparison, report::group_by_vm},
    record::WindowRecord,
};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A count of a record, by name.
type Field = (&'static str, fn(&WindowRecord) -> Option<u64>);

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// A legend's mark for a line series: a short stroke in its style.
fn line_mark(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// The labelled series' legend, boxed, at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

const FONT: &str = "sans-serif";

/// `12345.0` → `12,345`; `0.5` → `0.5`.
fn axis_count(v: &f64) -> String {
    if *v >= 1.0 {
        crate::analysis::report::thousands(Some(v.round() as u64))
    } else {
        format!("{v}")
    }
}

/// Log axes cannot show 0: counts are drawn at max(v, 0.5), the axis starts at 0.5 and the
/// charts say so.
const LOG_FLOOR: f64 = 0.5;

fn color(i: usize) -> RGBColor {
    // Distinguishable on white, in order: blue, orange, green, red, purple, brown, pink, grey.
    const COLORS: [(u8, u8, u8); 8] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
    ];
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

/// Writes `svg` to `path`: as is for `.svg`, rendered to PNG for `.png`.
pub fn write(path: &Path, svg: &str) -> anyhow::Result<()> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => write_private(path, svg.as_bytes()),
        Some("png") => write_private(path, &svg_to_png(svg)?),
        _ => bail!(
            "{}: the plot's file name must end in .svg or .png",
            path.display()
        ),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    crate::outputs::output::create_private(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("writing {}", path.display()))
}

/// Renders an SVG to PNG with the system's fonts.
pub fn svg_to_png(svg: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = resvg::usvg::Options::default();
    let db = options.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps `sans-serif` to Arial, which Linux hosts rarely have: use a sans face that
    // is there (DejaVu Sans on Debian), else any face.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    let Some(sans) = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans"]
        .iter()
        .map(|s| s.to_string())
        .find(|f| families.contains(f))
        .or_else(|| families.iter().find(|f| f.contains("Sans")).cloned())
        .or_else(|| families.first().cloned())
    else {
        bail!("no fonts on this system to draw the chart's text into a PNG; write an .svg instead");
    };
    db.set_sans_serif_family(sans);
    let tree = resvg::usvg::Tree::from_str(svg, &options).context("parsing the chart")?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .context("allocating the image")?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().context("encoding the PNG")
}

/// Events per window, one line per VM: timer, read and write panels (log scale).
pub fn report_chart(records: &[WindowRecord]) -> anyhow::Result<String> {
    let groups = group_by_vm(records);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let panels = root.split_evenly((3, 1));
        let max_window = records.iter().map(|r| r.window).max().unwrap_or(0) + 1;
        let fields: [Field; 3] = [
            ("timer", |r| r.timer),
            ("read", |r| r.read),
            ("write", |r| r.write),
        ];
        for (panel, (name, field)) in panels.iter().zip(fields) {
            let max = records.iter().filter_map(field).max().unwrap_or(1).max(1) as f64;
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("{name} events per window (log scale; 0 drawn at {LOG_FLOOR})"),
                    (FONT, 18),
                )
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(0u64..max_window, (LOG_FLOOR..max * 2.0).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("window")
                .y_desc(name)
                .y_label_formatter(&axis_count)
                .draw()
                .map_err(err)?;
            for (i, g) in groups.iter().enumerate() {
                let points: Vec<(u64, f64)> = g
                    .windows
                    .iter()
                    .filter_map(|w| field(w).map(|v| (w.window, (v as f64).max(LOG_FLOOR))))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let c = color(i);
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(clean(g.name))
                    .legend(line_mark(c.stroke_width(2)));
                chart
                    .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                    .map_err(err)?;
            }
            draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn compare_panel(
    area: &Area<'_>,
    vm: &crate::analysis::compare::VmComparison,
) -> anyhow::Result<()> {
    let bars: Vec<(&str, Option<f64>, Option<f64>)> = vm
        .counts
        .iter()
        .filter(|m| m.name != "cpu_seconds")
        .map(|m| (m.name.as_str(), m.before, m.after))
        .collect();
    let max = bars
        .iter()
        .flat_map(|(_, b, a)| [*b, *a])
        .flatten()
        .fold(1.0, f64::max);
    let n = bars.len() as i32;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{} → {}: mean per {} s window (log scale)",
                clean(&vm.before),
                clean(&vm.after),
                vm.window_seconds
            ),
            (FONT, 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0..n * 3).into_segmented(),
            (LOG_FLOOR..max * 2.0).log_scale(),
        )
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 3)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) if i % 3 == 0 => {
                labels.get((*i / 3) as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_desc("events per window")
        .y_label_formatter(&axis_count)
        .draw()
        .map_err(err)?;
    let (before, after) = (RGBColor(214, 39, 40), RGBColor(44, 160, 44));
    for (i, (_, b, a)) in bars.iter().enumerate() {
        let x = i as i32 * 3;
        for (value, offset, c) in [(b, 0, before), (a, 1, after)] {
            if let Some(v) = value {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (SegmentValue::Exact(x + offset), LOG_FLOOR),
                            (SegmentValue::Exact(x + offset + 1), v.max(LOG_FLOOR)),
                        ],
                        c.filled(),
                    )))
                    .map_err(err)?;
            }
        }
    }
    for (label, c) in [("before", before), ("after", after)] {
        chart
            .draw_series(std::iter::empty::<Rectangle<(SegmentValue<i32>, f64)>>())
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)
}

/// Before vs after, one panel per VM pair: mean timer, read, write and fd events per window.
pub fn compare_chart(c: &Comparison) -> anyhow::Result<String> {
    if c.vms.is_empty() {
        bail!("no VM pairs to draw");
    }
    let mut svg = String::new();
    {
        let height = 380 * c.vms.len() as u32;
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (area, vm) in root.split_evenly((c.vms.len(), 1)).iter().zip(&c.vms) {
            compare_panel(area, vm)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Host CPU against VM count: every window, the mean per count, the straight-line fit, the
/// projection from the VMs' own QEMU CPU, and the budget.
pub fn capacity_chart(r: &CapacityReport) -> anyhow::Result<String> {
    if r.host_windows.is_empty() {
        bail!(
            "this recording has no host CPU per window (recorded by `profiler record` since \
             host figures were added, full windows only)"
        );
    }
    let budget = (r.cores - r.reserve_cores).max(0.0) * r.target_util;
    let max_vms = r.host_windows.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let x_max = (max_vms + 1) as f64;
    let y_max = r.host_windows.iter().map(|p| p.1).fold(budget, f64::max) * 1.15;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("host CPU against VMs running", (FONT, 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("VMs running")
            .y_desc("host cores busy")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(err)?;
        let grey = RGBColor(160, 160, 160);
        chart
            .draw_series(
                r.host_windows
                    .iter()
                    .map(|&(n, busy)| Circle::new((n as f64, busy), 3, grey.filled())),
            )
            .map_err(err)?
            .label("a window")
            .legend(move |(x, y)| Circle::new((x + 8, y), 3, grey.filled()));
        let blue = color(0);
        chart
            .draw_series(LineSeries::new(
                r.host.iter().map(|h| (h.vms as f64, h.busy_cores)),
                blue.stroke_width(2),
            ))
            .map_err(err)?
            .label("measured (mean per VM count)")
            .legend(line_mark(blue.stroke_width(2)));
        if let Some(c) = &r.ramp {
            let f = c.fit;
            let orange = color(1);
            // The band the slope's 95 % interval allows, pivoting on the mean VM count.
            if f.per_vm_ci95.is_finite() {
                let mean = r.host_windows.iter().map(|p| f64::from(p.0)).sum::<f64>()
                    / r.host_windows.len().max(1) as f64;
                let at =
                    |x: f64, slope: f64| f.base_cores + f.per_vm_cores * mean + slope * (x - mean);
                let (lo, hi) = (
                    f.per_vm_cores - f.per_vm_ci95,
                    f.per_vm_cores + f.per_vm_ci95,
                );
                let steps = 40;
                let xs: Vec<f64> = (0..=steps)
                    .map(|i| x_max * i as f64 / steps as f64)
                    .collect();
                let mut band: Vec<(f64, f64)> =
                    xs.iter().map(|&x| (x, at(x, lo).max(at(x, hi)))).collect();
                band.extend(xs.iter().rev().map(|&x| (x, at(x, lo).min(at(x, hi)))));
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        band,
                        orange.mix(0.15).filled(),
                    )))
                    .map_err(err)?
                    .label("the slope's 95 % interval")
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 4), (x + 20, y + 4)], orange.mix(0.15).filled())
                    });
            }
            chart
                .draw_series(LineSeries::new(
                    [
                        (0.0, f.base_cores),
                        (x_max, f.base_cores + f.per_vm_cores * x_max),
                    ],
                    orange.stroke_width(1),
                ))
                .map_err(err)?
                .label(format!(
                    "line: {:.2} + {:.4} ± {:.4}/VM (R² {:.2}): {}",
                    f.base_cores,
                    f.per_vm_cores,
                    f.per_vm_ci95,
                    f.r_squared,
                    match c.verdict {
                        crate::analysis::capacity::RampVerdict::Agrees { .. } => "agrees",
                        crate::analysis::capacity::RampVerdict::Disagrees => "disagrees",
                        crate::analysis::capacity::RampVerdict::Unresolved { .. } => "unresolved",
                    }
                ))
                .legend(line_mark(orange.into()));
            // The projection from the VMs' own cost: the base load plus each VM's QEMU CPU.
            let per_vm = c.per_vm_cost_cores;
            let green = color(2);
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, f.base_cores), (x_max, f.base_cores + per_vm * x_max)],
                    6,
                    4,
                    green.stroke_width(2),
                ))
                .map_err(err)?
                .label(format!("projection from the VMs' own CPU: {per_vm:.4}/VM"))
                .legend(line_mark(green.stroke_width(2)));
        }
        let red = color(3);
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, budget), (x_max, budget)],
                8,
                6,
                red.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("budget: {budget:.2} cores"))
            .legend(line_mark(red.into()));
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{
        capacity::{CapacityRequest, capacity},
        compare::compare,
    };

    fn records() -> Vec<WindowRecord> {
        let mut out = Vec::new();
        for n in 0..6u64 {
            for (name, timer) in [("noisy", 57_990u64), ("quiet", 267)] {
                let mut r = crate::record::tests::sample();
                r.window = n;
                r.vm.name = name.into();
                r.timer = Some(timer);
                r.read = Some(if name == "noisy" { 918 } else { 0 });
                r.write = Some(12);
                r.host = Some(crate::record::HostWindow {
                    cpus: 2,
                    busy_cpu_seconds: 3.0 + n as f64,
                    vms_running: 1 + n as u32 / 2,
                    busy_source: None,
                    proc_stat_busy_cpu_seconds: None,
                    memory_bytes: None,
                    profiler_cpu_seconds: None,
                });
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn charts_are_svg_with_their_labels() {
        let svg = report_chart(&records()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in ["timer events per window", "noisy", "quiet", "window"] {
            assert!(svg.contains(text), "missing {text}");
        }
        let r = records();
        let (before, after): (Vec<_>, Vec<_>) = r.into_iter().partition(|r| r.vm.name == "noisy");
        let c = compare(&before, &after, &[], 0.0);
        let svg = compare_chart(&c).unwrap();
        assert!(svg.contains("noisy → quiet") && svg.contains("before") && svg.contains("after"));
        let report = capacity(
            &records(),
            &CapacityRequest {
                target_util: 0.8,
                ..CapacityRequest::WHOLE_HOST
            },
            2.0,
        );
        let svg = capacity_chart(&report).unwrap();
        assert!(svg.contains("host CPU against VMs running") && svg.contains("budget: 1.60 cores"));
    }

    #[test]
    fn png_where_fonts_exist_and_no_other_formats() {
        let svg = report_chart(&records()).unwrap();
        match svg_to_png(&svg) {
            Ok(png) => assert_eq!(&png[1..4], b"PNG"),
            Err(e) => assert!(e.to_string().contains("no fonts"), "{e:#}"),
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(write(&dir.path().join("x.jpg"), &svg).is_err());
        write(&dir.path().join("x.svg"), &svg).unwrap();
    }
}
