//! PNG charts (plotters, bitmap backend): one bar chart per scenario of its headline metric, and
//! an overview of meshgate's ratio against nginx and haproxy on every scenario's headline.
//! Text needs a TrueType font; the DejaVu Sans of Debian's `fonts-dejavu-core` is used when
//! present, else the PNGs are skipped with a message (the SVGs and the table do not need it).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{Better, Row, fmt_num};

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the font once; Err says why charts cannot be drawn.
pub fn init_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or("no DejaVuSans.ttf (Debian package fonts-dejavu-core)")?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps the font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const MESHGATE: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const OTHER: RGBColor = RGBColor(0xa0, 0xae, 0xc0);

/// A bar per proxy: `bars` as (proxy, value); None values are left out.
pub fn bars_png(path: &Path, title: &str, subtitle: &str, bars: &[(String, f64)]) -> Result<()> {
    init_font()?;
    if bars.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: {subtitle}"),
            ("sans-serif", 16).into_font(),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len().saturating_sub(1)).into_segmented(), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| fmt_num(*v))
        .label_style(("sans-serif", 13))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
        let color = if name == "meshgate" { MESHGATE } else { OTHER };
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.filled(),
        );
        r.set_margin(0, 0, 30, 30);
        r
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            fmt_num(*v),
            (SegmentValue::CenterOf(i), *v + max * 0.03),
            ("sans-serif", 13).into_font(),
        )
    }))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// meshgate / baseline for each scenario's headline row (higher-is-better rows as is,
/// lower-is-better rows inverted so that > 1 always means meshgate is better).
pub fn overview_png(path: &Path, rows: &[(Row, usize)], columns: &[String]) -> Result<()> {
    init_font()?;
    let idx = |n: &str| columns.iter().position(|c| c == n);
    let (Some(m), Some(h), Some(n)) = (idx("meshgate"), idx("haproxy"), idx("nginx")) else {
        return Ok(());
    };
    let adv = |row: &Row, b: usize| -> Option<f64> {
        let (mv, bv) = (row.values[m]?, row.values[b]?);
        if mv <= 0.0 || bv <= 0.0 {
            return None;
        }
        Some(if row.better == Better::Lower {
            bv / mv
        } else {
            mv / bv
        })
    };
    let data: Vec<(String, Option<f64>, Option<f64>)> = rows
        .iter()
        .map(|(r, _)| (r.scenario.clone(), adv(r, n), adv(r, h)))
        .filter(|d| d.1.is_some() || d.2.is_some())
        .collect();
    if data.is_empty() {
        return Ok(());
    }
    let max = data
        .iter()
        .flat_map(|d| [d.1, d.2])
        .flatten()
        .fold(1.0f64, f64::max)
        * 1.15;
    let height = 80 + 34 * data.len() as u32;
    let root = BitMapBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let labels: Vec<String> = data.iter().map(|d| d.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "meshgate advantage on each headline (x; > 1 = meshgate better)",
            ("sans-serif", 16).into_font(),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(130)
        .build_cartesian_2d(0.0..max, (0..data.len() - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format!("{v:.1}x"))
        .label_style(("sans-serif", 13))
        .draw()?;
    let bar = |i: usize, v: f64, upper: bool, color: RGBColor| {
        let mut r = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (v, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        if upper {
            r.set_margin(4, 17, 0, 0);
        } else {
            r.set_margin(17, 4, 0, 0);
        }
        r
    };
    chart
        .draw_series(
            data.iter()
                .enumerate()
                .filter_map(|(i, d)| d.1.map(|v| bar(i, v, true, MESHGATE))),
        )?
        .label("vs nginx")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], MESHGATE.filled()));
    chart
        .draw_series(
            data.iter()
                .enumerate()
                .filter_map(|(i, d)| d.2.map(|v| bar(i, v, false, OTHER))),
        )?
        .label("vs haproxy")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], OTHER.filled()));
    chart.draw_series(std::iter::once(PathElement::new(
        vec![
            (1.0, SegmentValue::Exact(0)),
            (1.0, SegmentValue::Exact(data.len())),
        ],
        BLACK.stroke_width(1),
    )))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
