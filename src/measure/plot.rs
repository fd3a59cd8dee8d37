//! Log–log plots of error against NFE (plotters, PNG). The font (DejaVu Sans, Bitstream
//! Vera licence, see assets/) is embedded so plots render the same on any machine.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        // The embedded file is a valid font; failing to parse it is a build defect.
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .unwrap_or_else(|_| panic!("embedded DejaVuSans.ttf is not a valid font"));
    });
}

/// One line of a panel: a label and its (NFE, value) points.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel of a figure.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// A horizontal reference level (e.g. a finite-sample floor), with its label.
    pub floor: Option<(f64, String)>,
}

fn palette(i: usize) -> RGBColor {
    const C: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    let (r, g, b) = C[i % C.len()];
    RGBColor(r, g, b)
}

/// A marker of one of four shapes, centred at a pixel offset.
fn marker<DB: DrawingBackend>(
    at: (i32, i32),
    shape: usize,
    color: RGBColor,
) -> DynElement<'static, DB, (i32, i32)> {
    match shape {
        0 => Circle::new(at, 4, color.filled()).into_dyn(),
        1 => TriangleMarker::new(at, 6, color.filled()).into_dyn(),
        2 => Cross::new(at, 5, color.stroke_width(2)).into_dyn(),
        _ => Circle::new(at, 5, color.stroke_width(2)).into_dyn(),
    }
}

/// NFE tick positions inside `[lo, hi]` (a log axis would label only 10, 100, ...).
fn nfe_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = Vec::new();
    let mut decade = 1.0;
    while decade <= hi * 10.0 {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let t = m * decade;
            if t >= lo && t <= hi {
                v.push(t);
            }
        }
        decade *= 10.0;
    }
    if v.len() < 4 {
        // A narrow range (e.g. 4 to 10 NFE): every whole NFE.
        v = (lo.ceil() as i64..=hi.floor() as i64)
            .map(|n| n as f64)
            .collect();
    }
    v
}

fn log_bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.filter(|v| v.is_finite() && *v > 0.0).collect();
    if v.is_empty() {
        return None;
    }
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    Some((lo / 1.5, hi * 1.5))
}

/// Draws the panels side by side into a PNG at `path` (written atomically).
pub fn loglog_png(path: &Path, panels: &[Panel]) -> Result<()> {
    register_font();
    let (w, h) = (880 * panels.len() as u32, 600u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let areas = root.split_evenly((1, panels.len()));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("plot buffer size"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::io::write_atomic(path, &png)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot: {e:?}");
    // The legend gets its own column on the right, so it never hides a line.
    let (aw, _) = area.dim_in_pixel();
    let (area, legend) = area.split_horizontally(aw.saturating_sub(170));
    let area = &area;
    let xs = p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.0));
    let ys = p
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|q| q.1))
        .chain(p.floor.as_ref().map(|f| f.0));
    let (Some((x0, x1)), Some((y0, mut y1))) = (log_bounds(xs), log_bounds(ys)) else {
        area.titled(&format!("{} (no data)", p.title), ("sans-serif", 22))
            .map_err(err)?;
        return Ok(());
    };
    // Diverging runs (errors of 1e2 at 5 NFE) would flatten everything else: cap the axis
    // at 100× the median value; those points leave the top of the chart.
    let mut all: Vec<f64> = p
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|q| q.1))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    all.sort_by(f64::total_cmp);
    if let Some(&med) = all.get(all.len() / 2) {
        y1 = y1.min(100.0 * med).max(y0 * 10.0);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x0..x1).log_scale().with_key_points(nfe_ticks(x0, x1)),
            (y0..y1).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("NFE")
        .y_desc(p.y_label.as_str())
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .draw()
        .map_err(err)?;
    let mut entries: Vec<(String, Option<(RGBColor, usize)>)> = Vec::new();
    if let Some((level, label)) = &p.floor {
        chart
            .draw_series(LineSeries::new(
                [(x0, *level), (x1, *level)],
                ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
            ))
            .map_err(err)?;
        entries.push((label.clone(), None));
    }
    for (i, line) in p.lines.iter().enumerate() {
        let color = palette(i);
        let pts: Vec<(f64, f64)> = line
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0)
            .collect();
        // 10 colours × 4 marker shapes keep up to 40 lines apart.
        let shape = (i / 10) % 4;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|&q| EmptyElement::at(q) + marker((0, 0), shape, color)),
            )
            .map_err(err)?;
        entries.push((line.label.clone(), Some((color, shape))));
    }
    let step = ((legend.dim_in_pixel().1 as i32 - 60) / entries.len().max(1) as i32).clamp(8, 18);
    let font = ("sans-serif", (step - 3).clamp(10, 14));
    for (k, (label, style)) in entries.iter().enumerate() {
        let y = 50 + k as i32 * step;
        match style {
            Some((color, shape)) => {
                legend
                    .draw(&PathElement::new(
                        vec![(4, y), (26, y)],
                        color.stroke_width(2),
                    ))
                    .map_err(err)?;
                legend
                    .draw(&(EmptyElement::at((15, y)) + marker((0, 0), *shape, *color)))
                    .map_err(err)?;
            }
            None => {
                legend
                    .draw(&PathElement::new(vec![(4, y), (26, y)], BLACK.mix(0.5)))
                    .map_err(err)?;
            }
        }
        legend
            .draw(&Text::new(label.clone(), (32, y - step / 2 + 2), font))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nfe_ticks;

    #[test]
    fn nfe_axes_have_ticks_below_ten() {
        assert_eq!(
            nfe_ticks(3.5, 10.5),
            vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
        );
        let t = nfe_ticks(3.0, 150.0);
        for want in [3.0, 5.0, 10.0, 20.0, 50.0, 100.0] {
            assert!(t.contains(&want), "{t:?}");
        }
        assert!(t.iter().all(|&v| (3.0..=150.0).contains(&v)));
    }
}
