//! The picture: joint accuracy against each method's swept setting (plotters,
//! SVG backend), one panel per kind of setting, with the base and the two
//! fine-tunes as horizontal reference lines.

use std::path::Path;

use plotters::prelude::*;

use crate::DemoError;

/// One line of the plot: a method's joint accuracy at each value of its
/// setting (one point for a method without a sweep).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(setting value, joint accuracy)`, in increasing setting order.
    pub points: Vec<(f64, f64)>,
}

/// One panel: the methods whose swept setting is `axis`.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// Name of the x axis (the setting).
    pub axis: String,
    /// The methods' lines.
    pub series: Vec<Series>,
}

/// Draws `panels` side by side into the SVG file `path`; `references` are
/// horizontal lines (label, joint accuracy) drawn in every panel.
pub fn draw(path: &Path, panels: &[Panel], references: &[(String, f64)]) -> Result<(), DemoError> {
    let err = |e: &dyn std::fmt::Display| DemoError::Plot {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let n = panels.len().max(1);
    let root = SVGBackend::new(path, (520 * n as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, n));
    for (panel, area) in panels.iter().zip(&areas) {
        // Flat lines (methods without a sweep) do not set the x range.
        let xs = panel
            .series
            .iter()
            .filter(|s| s.points.len() > 1)
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (mut lo, mut hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        if !lo.is_finite() || !hi.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let pad = (hi - lo) * 0.05;
        let (lo, hi) = (lo - pad, hi + pad);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0.0..1.0)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(panel.axis.as_str())
            .y_desc("joint accuracy, digits 0-9")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (label, y)) in references.iter().enumerate() {
            let color = [BLACK.mix(0.55), RED.mix(0.45), BLUE.mix(0.45)][i % 3];
            let style = ShapeStyle::from(color).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(vec![(lo, *y), (hi, *y)], 6, 4, style))
                .map_err(|e| err(&e))?
                .label(format!("{label} ({y:.3})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        for (i, s) in panel.series.iter().enumerate() {
            let color = Palette99::pick(i + 3).to_rgba();
            let style = ShapeStyle::from(color).stroke_width(2);
            let points = if s.points.len() == 1 {
                // A method without a sweep: a flat line at its one value.
                vec![(lo, s.points[0].1), (hi, s.points[0].1)]
            } else {
                s.points.clone()
            };
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(|e| err(&e))?
                .label(s.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            chart
                .draw_series(
                    s.points
                        .iter()
                        .filter(|_| s.points.len() > 1)
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_every_label() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.svg");
        let panels = vec![
            Panel {
                title: "by lambda".into(),
                axis: "lambda".into(),
                series: vec![
                    Series {
                        label: "task_arithmetic".into(),
                        points: vec![(0.5, 0.8), (1.0, 0.7)],
                    },
                    Series {
                        label: "linear".into(),
                        points: vec![(0.0, 0.6)],
                    },
                ],
            },
            Panel {
                title: "by density".into(),
                axis: "density".into(),
                series: vec![Series {
                    label: "ties".into(),
                    points: vec![(0.2, 0.9), (1.0, 0.85)],
                }],
            },
        ];
        draw(&path, &panels, &[("base".into(), 0.5)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        for label in [
            "task_arithmetic",
            "linear",
            "ties",
            "base (0.500)",
            "by density",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        let e = draw(&tmp.path().join("no/such/dir.svg"), &panels, &[]).unwrap_err();
        assert!(e.to_string().contains("dir.svg"), "{e}");
    }
}
