//! The latency plot: commit → consumer percentiles against the insert rate,
//! relay and polling baselines, one panel per transaction shape. Drawn with
//! plotters' bitmap backend; text uses DejaVu Sans embedded from the `dejavu`
//! crate through plotters' `ab_glyph` feature, so no fontconfig or system
//! font is needed. Encoded with the `png` crate.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::results::Window;

const W: u32 = 1400;
const H: u32 = 620;

fn color(subject: &str) -> RGBColor {
    match subject {
        "relay" => RGBColor(31, 119, 180),
        "relay@mock" => RGBColor(44, 160, 44),
        "broker-floor@mock" => RGBColor(190, 190, 190),
        "broker-floor" => RGBColor(120, 120, 120),
        s if s.ends_with("ms") => RGBColor(255, 127, 14),
        _ => RGBColor(214, 39, 40),
    }
}

pub fn draw(windows: &[Window], path: &Path) -> Result<(), String> {
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded DejaVu font did not load".to_string())?;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (title, body) = root.split_vertically(40);
        title
            .titled(
                "outbox-relay vs polling: commit → consumer latency (log-log)",
                ("sans-serif", 22),
            )
            .map_err(|e| e.to_string())?;
        let mut shapes: Vec<usize> = windows
            .iter()
            .filter(|w| !w.subject.starts_with("broker-floor"))
            .map(|w| w.rows_per_txn)
            .collect();
        shapes.sort_unstable();
        shapes.dedup();
        let panels = body.split_evenly((1, shapes.len().max(1)));
        for (panel, shape) in panels.iter().zip(&shapes) {
            panel_chart(panel, windows, *shape)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    let file =
        std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&buf))
        .map_err(|e| format!("write {}: {e}", path.display()))
}

fn panel_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    windows: &[Window],
    shape: usize,
) -> Result<(), String> {
    let ws: Vec<&Window> = windows
        .iter()
        .filter(|w| {
            (w.rows_per_txn == shape || w.subject.starts_with("broker-floor"))
                && w.latency.samples > 0
        })
        .collect();
    let rates = ws.iter().map(|w| w.target_rate as f64);
    let x_min = rates.clone().fold(f64::INFINITY, f64::min).min(1000.0) * 0.7;
    let x_max = rates.fold(0.0, f64::max).max(1000.0) * 1.4;
    let y_vals = ws
        .iter()
        .flat_map(|w| [w.latency.p50_ms, w.latency.p99_ms, w.latency.p999_ms]);
    let y_min = y_vals
        .clone()
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        * 0.5;
    let y_max = y_vals.fold(1.0, f64::max) * 2.0;
    let caption = if shape == 1 {
        "1 row per transaction".to_string()
    } else {
        format!("{shape} rows per transaction")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("insert rate (events/s)")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&|v| {
            // Only round rates: the log mesh has a key point at every 1000 too.
            let r = v.round() as u64;
            if [1000, 2000, 5000, 10000, 20000, 50000, 100000].contains(&r)
                && (v - r as f64).abs() < 1.0
            {
                format!("{r}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;

    let mut subjects: Vec<&str> = ws.iter().map(|w| w.subject.as_str()).collect();
    subjects.dedup();
    subjects.sort_by_key(|s| {
        (
            !s.starts_with("relay"),
            s.starts_with("broker-floor"),
            s.to_string(),
        )
    });
    subjects.dedup();
    type Pick = fn(&Window) -> f64;
    let percentiles: [(&str, Pick, u32); 3] = [
        ("p50", |w| w.latency.p50_ms, 1),
        ("p99", |w| w.latency.p99_ms, 3),
        ("p99.9", |w| w.latency.p999_ms, 1),
    ];
    for subject in subjects {
        let c = color(subject);
        let mut pts: Vec<&Window> = ws
            .iter()
            .copied()
            .filter(|w| w.subject == subject)
            .collect();
        pts.sort_by_key(|w| w.target_rate);
        for (name, pick, width) in percentiles {
            if subject != "relay" && name == "p99.9" {
                continue; // keep the plot readable: the others' p99.9 ≈ their p99
            }
            let series: Vec<(f64, f64)> = pts
                .iter()
                .map(|w| (w.target_rate as f64, pick(w).max(y_min)))
                .collect();
            let style = ShapeStyle::from(&c).stroke_width(width);
            let label = format!("{subject} {name}");
            let anno = if name == "p99.9" {
                chart
                    .draw_series(DashedLineSeries::new(series.clone(), 8, 5, style))
                    .map_err(|e| e.to_string())?
            } else {
                chart
                    .draw_series(LineSeries::new(series.clone(), style))
                    .map_err(|e| e.to_string())?
            };
            anno.label(label).legend(move |(x, y)| {
                let line = PathElement::new(vec![(x, y), (x + 24, y)], style);
                let mark = match name {
                    "p50" => Circle::new((x + 12, y), 4, c.filled()).into_dyn(),
                    "p99" => TriangleMarker::new((x + 12, y), 5, c.filled()).into_dyn(),
                    _ => Cross::new((x + 12, y), 4, c.stroke_width(2)).into_dyn(),
                };
                EmptyElement::at((0, 0)) + line + mark
            });
            let marker = series.iter().map(move |&(x, y)| match name {
                "p50" => Circle::new((x, y), 4, c.filled()).into_dyn(),
                "p99" => TriangleMarker::new((x, y), 5, c.filled()).into_dyn(),
                _ => Cross::new((x, y), 4, c.stroke_width(2)).into_dyn(),
            });
            chart.draw_series(marker).map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())
}
