//! The alpha-sweep plot (Fig. 6): iterations to flip the label against alpha, drawn with
//! plotters as SVG (text as SVG text, so no font files are needed).

use crate::error::{Error, Result};
use plotters::prelude::*;

/// One line of the plot: a label and (alpha, mean iterations) points.
pub(crate) struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn drawing(e: impl std::fmt::Display) -> Error {
    Error::Run(format!("drawing the alpha-sweep plot: {e}"))
}

/// The SVG text of the plot, alpha on a log axis.
pub(crate) fn alpha_sweep_svg(title: &str, series: &[Series]) -> Result<String> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, 0f64, 1f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() || x0 <= 0.0 {
        return Err(Error::Run("the alpha sweep has no points".into()));
    }
    if x1 <= x0 {
        x1 = x0 * 2.0;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((x0 / 1.2..x1 * 1.2).log_scale(), 0f64..y1 * 1.1)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc("alpha (pixel units, log scale)")
            .y_desc("iterations to flip (mean)")
            .draw()
            .map_err(drawing)?;
        for (k, s) in series.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(drawing)?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(drawing)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}
