//! PNG plots of the results: line charts with a logarithmic y axis, one panel per device
//! latency where that matters. Text is drawn with a system TrueType font (DejaVu Sans,
//! Debian's fonts-dejavu-core); the PNG is encoded from plotters' RGB buffer.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::remote::{self, Figure1, Op};
use crate::report::Results;
use crate::{lookups, rmw, scans};

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Line colours, in series order: distinct on white and for the common colour blindnesses.
const COLORS: [RGBColor; 7] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 0, 0),
];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

struct Panel {
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    /// Plot x on a log scale (labels show the values, not their logarithms).
    x_log: bool,
    /// Join each series' points with lines (else points alone: the x values are not a
    /// sequence).
    lines: bool,
    series: Vec<Series>,
}

pub fn all(r: &Results, out: &Path) -> Result<()> {
    draw(&out.join("lookup-latency.png"), &lookup_latency(r))?;
    draw(&out.join("lookup-throughput.png"), &lookup_throughput(r))?;
    draw(&out.join("scan.png"), &[scan(r)])?;
    draw(&out.join("rmw.png"), &[read_modify_write(r)])
}

/// The remote section's plots: latency against round trips for every operation, and the
/// B+-tree lookups by depth, one panel per `nbd_delay`.
pub fn remote(r: &remote::Results, out: &Path) -> Result<()> {
    draw(&out.join("remote-round-trips.png"), &remote_round_trips(r))?;
    draw(&out.join("remote-btree.png"), &remote_btree(r))
}

fn remote_round_trips(r: &remote::Results) -> Vec<Panel> {
    r.plan
        .delays_us
        .iter()
        .map(|&d| Panel {
            title: format!("every operation, nbd_delay={d} µs"),
            x_desc: "NBD round trips per operation",
            y_desc: "median µs per operation",
            x_log: true,
            lines: false,
            series: Figure1::ALL
                .iter()
                .map(|&way| {
                    let points = r
                        .ops()
                        .into_iter()
                        .filter_map(|op| {
                            let row = r.way(op, way, d)?;
                            Some((row.round_trips?.max(0.5), row.stats.median_us))
                        })
                        .collect();
                    Series {
                        name: way.label().into(),
                        points,
                    }
                })
                .collect(),
        })
        .collect()
}

fn remote_btree(r: &remote::Results) -> Vec<Panel> {
    let depths: Vec<usize> = r
        .ops()
        .into_iter()
        .filter_map(|op| match op {
            Op::Btree { depth } => Some(depth),
            _ => None,
        })
        .collect();
    r.plan
        .delays_us
        .iter()
        .map(|&d| {
            let mut series: Vec<Series> = Figure1::ALL
                .iter()
                .map(|&way| Series {
                    name: way.label().into(),
                    points: depths
                        .iter()
                        .filter_map(|&depth| {
                            Some((depth as f64, r.way_us(Op::Btree { depth }, way, d)?))
                        })
                        .collect(),
                })
                .collect();
            series.push(Series {
                name: "floor: one round trip + the run on a local mount".into(),
                points: depths
                    .iter()
                    .filter_map(|&depth| Some((depth as f64, r.floor_us(Op::Btree { depth }, d)?)))
                    .collect(),
            });
            Panel {
                title: format!("B+-tree lookup over NBD, nbd_delay={d} µs"),
                x_desc: "tree depth (dependent reads)",
                y_desc: "median µs per lookup",
                x_log: false,
                lines: true,
                series,
            }
        })
        .collect()
}

const LOOKUP_WAYS: [lookups::Way; 6] = [
    lookups::Way::Offload,
    lookups::Way::OffloadBatch,
    lookups::Way::MountDirect,
    lookups::Way::MountCached,
    lookups::Way::HostCached,
    lookups::Way::HostDirect,
];

fn lookup_latency(r: &Results) -> Vec<Panel> {
    let depths = 1..=r.plan.max_depth;
    r.plan
        .device_us
        .iter()
        .map(|&device_us| {
            let mut series: Vec<Series> = LOOKUP_WAYS
                .iter()
                .map(|&way| Series {
                    name: way.label().into(),
                    points: depths
                        .clone()
                        .filter_map(|d| Some((d as f64, r.lookup_us(device_us, d, way)?)))
                        .collect(),
                })
                .collect();
            series.push(Series {
                name: "floor: null RUN + raw device reads".into(),
                points: depths
                    .clone()
                    .filter_map(|d| Some((d as f64, r.floor_us(device_us, d)?)))
                    .collect(),
            });
            Panel {
                title: format!("lookup latency, device +{device_us} µs"),
                x_desc: "tree depth (dependent reads)",
                y_desc: "median µs per lookup",
                x_log: false,
                lines: true,
                series,
            }
        })
        .collect()
}

fn lookup_throughput(r: &Results) -> Vec<Panel> {
    let depth = r.plan.max_depth.min(4);
    r.plan
        .device_us
        .iter()
        .map(|&device_us| Panel {
            title: format!("depth {depth}, device +{device_us} µs"),
            x_desc: "threads",
            y_desc: "lookups per second",
            x_log: false,
            lines: true,
            series: [
                lookups::Way::Offload,
                lookups::Way::OffloadBatch,
                lookups::Way::MountDirect,
                lookups::Way::RawDevice,
            ]
            .iter()
            .map(|&way| Series {
                name: way.label().into(),
                points: r
                    .plan
                    .threads
                    .iter()
                    .filter_map(|&t| {
                        let row = r.lookup(device_us, depth, way, t)?;
                        Some((t as f64, row.stats.ops_per_sec))
                    })
                    .collect(),
            })
            .collect(),
        })
        .collect()
}

fn scan(r: &Results) -> Panel {
    Panel {
        title: format!("scan of {} MiB of 16-byte records", r.plan.scan_bytes >> 20),
        x_desc: "selectivity (%)",
        y_desc: "GB/s of file scanned",
        x_log: true,
        lines: true,
        series: scans::Way::ALL
            .iter()
            .map(|&way| Series {
                name: way.label().into(),
                points: r
                    .scans
                    .iter()
                    .filter(|row| row.way == way)
                    .map(|row| (row.selectivity * 100.0, row.gb_per_sec))
                    .collect(),
            })
            .collect(),
    }
}

fn read_modify_write(r: &Results) -> Panel {
    Panel {
        title: "read-modify-write of 64-byte records".into(),
        x_desc: "workers",
        y_desc: "increments per second",
        x_log: false,
        lines: true,
        series: [rmw::Way::Offload, rmw::Way::ReadWrite]
            .iter()
            .map(|&way| Series {
                name: way.label().into(),
                points: r
                    .rmw
                    .iter()
                    .filter(|row| row.way == way)
                    .map(|row| (row.workers as f64, row.stats.ops_per_sec))
                    .collect(),
            })
            .collect(),
    }
}

/// Registers the font once; plotters draws no text without one.
fn font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONTS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("the plots need DejaVu Sans (Debian: apt-get install fonts-dejavu-core)")?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
            .map_err(|_| "DejaVuSans.ttf is not a font".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn draw(path: &Path, panels: &[Panel]) -> Result<()> {
    font()?;
    let (w, h) = (620 * panels.len() as u32, 560);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(plot_error)?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut png = png::Encoder::new(file, w, h);
    png.set_compression(png::Compression::Best);
    png.set_color(png::ColorType::Rgb);
    png.set_depth(png::BitDepth::Eight);
    png.write_header()?.write_image_data(&rgb)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

fn draw_panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    let tx = |x: f64| if p.x_log { x.log10() } else { x };
    let points = p.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points.filter(|(_, y)| *y > 0.0) {
        (x0, x1) = (x0.min(tx(x)), x1.max(tx(x)));
        (y0, y1) = (y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        bail!("nothing to plot in {:?}", p.title);
    }
    let pad = ((x1 - x0) * 0.05).max(0.25);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        // Headroom above the highest line for the legend.
        .build_cartesian_2d(x0 - pad..x1 + pad, (y0 / 1.6..y1 * 6.0).log_scale())
        .map_err(plot_error)?;
    // Depths, threads and workers are whole numbers: no ticks between them.
    let whole = !p.x_log
        && p.series
            .iter()
            .flat_map(|s| &s.points)
            .all(|(x, _)| x.fract() == 0.0);
    let x_label = |v: &f64| {
        let x = if p.x_log { 10f64.powf(*v) } else { *v };
        if whole && x.fract() != 0.0 {
            return String::new();
        }
        format!("{}", (x * 1000.0).round() / 1000.0)
    };
    chart
        .configure_mesh()
        .x_desc(p.x_desc)
        .y_desc(p.y_desc)
        .x_labels(if p.x_log { 5 } else { 8 })
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 13))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_error)?;
    for (i, s) in p.series.iter().enumerate() {
        // A floor is always black, whatever else the panel shows.
        let color = if s.name.starts_with("floor") {
            BLACK
        } else {
            COLORS[i % COLORS.len()]
        };
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(_, y)| *y > 0.0)
            .map(|&(x, y)| (tx(x), y))
            .collect();
        if p.lines {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(plot_error)?;
        } else {
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 5, color.filled())))
                .map_err(plot_error)?
                .label(s.name.as_str())
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, color.filled()));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// 1234567 → "1.2M", 0.05 → "0.05".
fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", (v / 1e5).round() / 10.0),
        v if v >= 1e3 => format!("{}k", (v / 1e2).round() / 10.0),
        v => format!("{}", (v * 100.0).round() / 100.0),
    }
}
