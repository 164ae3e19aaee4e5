//! Training curves as one self-contained HTML file: inline SVG, no script, no
//! external assets, so it opens anywhere and can be rewritten while training.
//!
//! Each panel has its own y axis, linear, or logarithmic when all its values are
//! positive and span more than two decades (a loss that falls from 10 to 0.01
//! is unreadable on a linear axis). Non-finite points are not drawn; the legend
//! says how many were left out.
use crate::error::Result;
use crate::io::write_atomic;
use std::fmt::Write as _;
use std::path::Path;

/// One curve: values by training step.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

/// One chart of a page, with its own axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Writes `series` as one chart under `title`.
pub fn write_loss_plot(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    write_plot_page(
        path,
        title,
        &[Panel {
            title: String::new(),
            series: series.to_vec(),
        }],
    )
}

/// Writes several charts (e.g. training losses, then validation metrics) on one page.
pub fn write_plot_page(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    write_atomic(path, render_page(title, panels).as_bytes())
}

/// The page [`write_plot_page`] writes.
pub fn render_page(title: &str, panels: &[Panel]) -> String {
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n\
         <style>body{{font-family:sans-serif;margin:1em}} h2{{font-size:1.1em}}</style>\n\
         </head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    for p in panels {
        if !p.title.is_empty() {
            let _ = writeln!(html, "<h2>{}</h2>", escape(&p.title));
        }
        html.push_str(&render_svg(&p.series));
        html.push('\n');
    }
    html.push_str("</body></html>\n");
    html
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 15.0;
const BOTTOM: f64 = 50.0;
/// Tableau 10.
const COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A linear or log10 axis from data range to pixels.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    px_lo: f64,
    px_hi: f64,
}

impl Axis {
    fn map(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (v.log10(), self.lo.log10(), self.hi.log10())
        } else {
            (v, self.lo, self.hi)
        };
        self.px_lo + (v - lo) / (hi - lo) * (self.px_hi - self.px_lo)
    }
}

/// 1, 2 or 5 times a power of ten, close to `range / target`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = range / target;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick values of a linear axis within [lo, hi].
fn linear_ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

fn tick_label(v: f64, step: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if v != 0.0 && (v.abs() >= 1e6 || step < 1e-4) {
        return format!("{v:.2e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Data range of the finite points, padded so curves do not sit on the frame.
fn y_axis(values: &[f64]) -> Axis {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (px_lo, px_hi) = (HEIGHT - BOTTOM, TOP);
    if values.is_empty() {
        return Axis { lo: 0.0, hi: 1.0, log: false, px_lo, px_hi };
    }
    if lo > 0.0 && hi / lo > 100.0 {
        // Out to whole decades, so the end ticks are labelled.
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf(hi.log10().ceil());
        return Axis { lo, hi, log: true, px_lo, px_hi };
    }
    let (lo, hi) = if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    };
    Axis { lo, hi, log: false, px_lo, px_hi }
}

/// At most two points (the extremes, in step order) per pixel column: long runs
/// keep their shape without a polyline of every step.
fn decimate(points: &[(f64, f64)], x: &Axis) -> Vec<(f64, f64)> {
    if points.len() <= 2 * (x.px_hi - x.px_lo) as usize {
        return points.to_vec();
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let col = x.map(points[i].0).floor();
        let mut j = i;
        let (mut imin, mut imax) = (i, i);
        while j < points.len() && x.map(points[j].0).floor() == col {
            if points[j].1 < points[imin].1 {
                imin = j;
            }
            if points[j].1 > points[imax].1 {
                imax = j;
            }
            j += 1;
        }
        let (a, b) = (imin.min(imax), imin.max(imax));
        out.push(points[a]);
        if b != a {
            out.push(points[b]);
        }
        i = j;
    }
    out
}

/// One chart: frame, ticks, grid, one polyline per series, legend on the right.
pub fn render_svg(series: &[Series]) -> String {
    // Points drawable on the chosen axis; a log axis is only chosen when every
    // finite value is positive, so finiteness is the only filter.
    let kept: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|&(x, v)| (x as f64, v))
                .collect()
        })
        .collect();
    let all: Vec<&(f64, f64)> = kept.iter().flatten().collect();
    let ys: Vec<f64> = all.iter().map(|p| p.1).collect();
    let y = y_axis(&ys);
    let (xlo, xhi) = match (
        all.iter().map(|p| p.0).reduce(f64::min),
        all.iter().map(|p| p.0).reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) if hi > lo => (lo, hi),
        (Some(lo), Some(_)) => (lo - 1.0, lo + 1.0),
        _ => (0.0, 1.0),
    };
    let x = Axis { lo: xlo, hi: xhi, log: false, px_lo: LEFT, px_hi: WIDTH - RIGHT };

    let (top, bottom, left, right) = (TOP, HEIGHT - BOTTOM, LEFT, WIDTH - RIGHT);
    let legend: Vec<String> = series
        .iter()
        .zip(&kept)
        .map(|(s, k)| match s.points.len() - k.len() {
            0 => s.name.clone(),
            n => format!("{} ({n} non-finite not shown)", s.name),
        })
        .collect();
    // The plot area is fixed; the picture grows to fit a long or tall legend.
    let longest = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let width = WIDTH.max(right + 40.0 + 7.0 * longest as f64);
    let height = HEIGHT.max(top + 20.0 + 18.0 * legend.len() as f64);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );

    // X ticks: whole steps.
    let xstep = nice_step(xhi - xlo, 8.0).max(1.0);
    for t in linear_ticks(xlo, xhi, xstep) {
        let px = x.map(t);
        let _ = writeln!(
            svg,
            "<line x1=\"{px:.2}\" y1=\"{top}\" x2=\"{px:.2}\" y2=\"{bottom}\" stroke=\"#eee\"/>\
             <text x=\"{px:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{}</text>",
            bottom + 16.0,
            tick_label(t, xstep)
        );
    }
    // Y ticks: decades on a log axis, 1-2-5 steps on a linear one.
    let yticks: Vec<(f64, String)> = if y.log {
        let (a, b) = (y.lo.log10().round() as i32, y.hi.log10().round() as i32);
        (a..=b).map(|e| (10f64.powi(e), format!("1e{e}"))).collect()
    } else {
        let step = nice_step(y.hi - y.lo, 6.0);
        linear_ticks(y.lo, y.hi, step)
            .into_iter()
            .map(|t| (t, tick_label(t, step)))
            .collect()
    };
    for (t, label) in &yticks {
        let py = y.map(*t);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{py:.2}\" x2=\"{right}\" y2=\"{py:.2}\" stroke=\"#eee\"/>\
             <text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{label}</text>",
            left - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"none\" stroke=\"#444\"/>",
        right - left,
        bottom - top
    );
    let _ = writeln!(
        svg,
        "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"middle\">step</text>",
        (left + right) / 2.0,
        HEIGHT - 8.0
    );
    if y.log {
        let _ = writeln!(
            svg,
            "<text x=\"14\" y=\"{:.2}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.2})\">\
             log scale</text>",
            (top + bottom) / 2.0,
            (top + bottom) / 2.0
        );
    }
    if all.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"middle\" fill=\"#888\">no data</text>",
            (left + right) / 2.0,
            (top + bottom) / 2.0
        );
    }

    for (i, (label, pts)) in legend.iter().zip(&kept).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = decimate(pts, &x);
        if pts.len() == 1 {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"3\" fill=\"{colour}\"/>",
                x.map(pts[0].0),
                y.map(pts[0].1)
            );
        } else if pts.len() > 1 {
            let coords: Vec<String> = pts
                .iter()
                .map(|&(px, py)| format!("{:.2},{:.2}", x.map(px), y.map(py)))
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
                coords.join(" ")
            );
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = right + 14.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{lx:.2}\" y1=\"{ly:.2}\" x2=\"{:.2}\" y2=\"{ly:.2}\" stroke=\"{colour}\" \
             stroke-width=\"3\"/><text x=\"{:.2}\" y=\"{:.2}\">{}</text>",
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(label)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("points=\"")
            .skip(1)
            .map(|rest| {
                rest[..rest.find('"').unwrap()]
                    .split(' ')
                    .map(|p| {
                        let (a, b) = p.split_once(',').unwrap();
                        (a.parse().unwrap(), b.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn linear_chart_maps_points_and_skips_non_finite() {
        let s = vec![
            Series { name: "loss <total>".into(), points: vec![(0, 1.0), (5, f64::NAN), (10, 0.5)] },
            Series { name: "val".into(), points: vec![(10, 0.75), (20, f64::INFINITY)] },
        ];
        let svg = render_svg(&s);
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 1, "the single finite `val` point is a marker, not a line");
        assert_eq!(lines[0].len(), 2);
        // x: steps 0..10 over [LEFT, WIDTH - RIGHT]; y: [0.5, 1] padded by 5%.
        assert_eq!(lines[0][0].0, LEFT);
        assert_eq!(lines[0][1].0, WIDTH - RIGHT);
        let y = |v: f64| (HEIGHT - BOTTOM) + (v - 0.475) / 0.55 * (TOP - (HEIGHT - BOTTOM));
        assert!((lines[0][0].1 - y(1.0)).abs() < 0.01);
        assert!((lines[0][1].1 - y(0.5)).abs() < 0.01);
        assert!(svg.contains("<circle"));
        assert!(svg.contains("loss &lt;total&gt; (1 non-finite not shown)"));
        assert!(svg.contains("val (1 non-finite not shown)"));
        assert!(!svg.contains("log scale"));
        let short = render_svg(&[Series { name: "loss".into(), points: vec![(0, 1.0)] }]);
        assert!(short.contains(&format!("width=\"{WIDTH}\" height=\"{HEIGHT}\"")));
        // 37 legend characters widen the picture.
        assert!(svg.contains(&format!("width=\"{}\"", WIDTH - RIGHT + 40.0 + 7.0 * 37.0)));
        let long = vec![Series { name: "x".repeat(100), points: vec![(0, 1.0)] }; 30];
        let big = render_svg(&long);
        let w = WIDTH - RIGHT + 40.0 + 700.0;
        let h = TOP + 20.0 + 18.0 * 30.0;
        assert!(big.contains(&format!("width=\"{w}\" height=\"{h}\"")), "{}", &big[..200]);
        assert!(svg.contains(">0.5<") || svg.contains(">0.50<"), "tick labels: {svg}");
    }

    #[test]
    fn log_axis_when_values_span_more_than_two_decades() {
        let s = vec![Series { name: "loss".into(), points: vec![(0, 5.0), (1, 0.5), (2, 0.01)] }];
        let svg = render_svg(&s);
        assert!(svg.contains("log scale"));
        for t in [">1e-2<", ">1e-1<", ">1e0<", ">1e1<"] {
            assert!(svg.contains(t), "missing tick {t}");
        }
        let line = &polylines(&svg)[0];
        // Decades are equally spaced: 5 -> 0.5 is one decade, 0.5 -> 0.01 is 1.7.
        let d1 = line[1].1 - line[0].1;
        let d2 = line[2].1 - line[1].1;
        assert!((d2 / d1 - 50f64.log10()).abs() < 1e-3, "{d1} {d2}");
        // Two decades exactly stay linear; a non-positive value forces linear.
        let lin = vec![Series { name: "a".into(), points: vec![(0, 1.0), (1, 0.01)] }];
        assert!(!render_svg(&lin).contains("log scale"));
        let neg = vec![Series { name: "a".into(), points: vec![(0, 100.0), (1, -0.001)] }];
        assert!(!render_svg(&neg).contains("log scale"));
    }

    #[test]
    fn long_series_are_decimated_keeping_extremes() {
        let pts: Vec<(u64, f64)> = (0..100_000u64).map(|i| (i, if i == 50_000 { 9.0 } else { 1.0 + (i % 7) as f64 * 0.1 })).collect();
        let svg = render_svg(&[Series { name: "l".into(), points: pts }]);
        let line = &polylines(&svg)[0];
        assert!(line.len() <= 2 * (WIDTH - RIGHT - LEFT) as usize + 2, "{} points", line.len());
        let top = line.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        assert!((top - (TOP + 0.05 / 1.1 * (HEIGHT - BOTTOM - TOP))).abs() < 0.5, "spike kept: {top}");
    }

    #[test]
    fn page_is_self_contained_and_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.html");
        let empty = Panel { title: "validation".into(), series: vec![] };
        let train = Panel {
            title: "train & loss".into(),
            series: vec![Series { name: "score".into(), points: vec![(1, 0.2), (2, 0.1)] }],
        };
        write_plot_page(&path, "run <1>", &[train, empty]).unwrap();
        let html = std::fs::read_to_string(&path).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<h1>run &lt;1&gt;</h1>") && html.contains("<h2>train &amp; loss</h2>"));
        assert_eq!(html.matches("<svg").count(), 2);
        assert!(html.contains("no data"));
        assert!(!html.contains("<script") && !html.contains("href=") && !html.contains("src="));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.html")], "no temporary file left");
        write_loss_plot(&path, "again", &[]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("<h1>again</h1>"));
    }
}
