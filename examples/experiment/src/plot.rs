//! `accuracy.png`: SLM accuracy per round (mean line, min/max thin lines) for every
//! variant, the LLM's task accuracy per round, and its general perplexity per round.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use crate::report::{Metrics, stats};

/// The TTF used for text: `$CROSSLM_FONT`, else DejaVu Sans (Debian `fonts-dejavu-core`).
fn font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("CROSSLM_FONT")
            .unwrap_or_else(|_| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
        let bytes = std::fs::read(&path).map_err(|e| format!("font {path}: {e}"))?;
        // plotters keeps registered fonts for the process's life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("font {path}: not a usable TTF"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws the plot into `path`.
pub fn plot(m: &Metrics, path: &Path) -> anyhow::Result<()> {
    font()?;
    draw(m, path)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))
}

fn draw(m: &Metrics, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let rounds = m.config.rounds as f64;
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));

    // SLM accuracy: round 0 is every variant's local-only start.
    let mut lo = 1.0f32;
    let mut hi = 0.0f32;
    for v in &m.variants {
        for r in &v.rounds {
            if let Some((_, a, b)) = stats(&r.slm) {
                lo = lo.min(a);
                hi = hi.max(b);
            }
        }
    }
    if lo > hi {
        (lo, hi) = (0.4, 1.0);
    }
    let (lo, hi) = ((lo - 0.02).max(0.0) as f64, (hi + 0.02).min(1.0) as f64);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(
            "SLM test accuracy (mean; thin: min/max)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.1..rounds + 0.1, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("accuracy")
        .x_labels(m.config.rounds as usize + 1)
        .draw()?;
    for (i, v) in m.variants.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = |f: fn((f32, f32, f32)) -> f32| -> Vec<(f64, f64)> {
            let mut pts: Vec<(f64, f64)> = v
                .rounds
                .iter()
                .filter_map(|r| stats(&r.slm).map(|s| (r.round as f64, f(s) as f64)))
                .collect();
            // A one-point variant (Centralized) is drawn as a level across the rounds.
            if pts.len() == 1 {
                pts = vec![(0.0, pts[0].1), (rounds, pts[0].1)];
            }
            pts
        };
        chart
            .draw_series(LineSeries::new(pts(|s| s.0), color.stroke_width(3)))?
            .label(v.variant.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        chart.draw_series(LineSeries::new(
            pts(|s| s.1),
            color.mix(0.5).stroke_width(1),
        ))?;
        chart.draw_series(LineSeries::new(
            pts(|s| s.2),
            color.mix(0.5).stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // The LLM: task accuracy and perplexity of the CrossLM variant, per round.
    let llm: Vec<_> = m
        .variant(crate::config::Variant::Crosslm)
        .map(|v| v.rounds.iter().filter_map(|r| r.llm.clone()).collect())
        .unwrap_or_default();
    let series =
        |f: fn(&crosslm_coordinator::tuning::LlmReport) -> Option<f64>| -> Vec<(f64, f64)> {
            llm.iter()
                .filter_map(|r| f(r).map(|x| (r.round as f64, x)))
                .collect()
        };
    let acc = series(|r| r.task_accuracy);
    let cal = series(|r| r.task_accuracy_calibrated);
    let all: Vec<f64> = acc.iter().chain(&cal).map(|p| p.1).collect();
    let (alo, ahi) = bounds(&all, 0.4, 1.0, 0.02);
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("LLM task accuracy (CrossLM)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.1..rounds + 0.1, alo..ahi)?;
    chart
        .configure_mesh()
        .x_desc("round (0 = zero-shot)")
        .y_desc("accuracy")
        .x_labels(m.config.rounds as usize + 1)
        .draw()?;
    for (name, pts, color) in [("raw", acc, BLUE), ("calibrated", cal, RED)] {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let ppl = series(|r| r.perplexity);
    let vals: Vec<f64> = ppl.iter().map(|p| p.1).collect();
    let (plo, phi) = bounds(&vals, 0.0, 100.0, 0.0);
    let pad = ((phi - plo) * 0.2).max(phi * 0.02);
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("LLM perplexity on general text", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.1..rounds + 0.1, (plo - pad).max(0.0)..phi + pad)?;
    chart
        .configure_mesh()
        .x_desc("round (0 = start)")
        .y_desc("perplexity")
        .x_labels(m.config.rounds as usize + 1)
        .draw()?;
    chart.draw_series(LineSeries::new(ppl.clone(), BLACK.stroke_width(3)))?;
    chart.draw_series(ppl.iter().map(|p| Circle::new(*p, 4, BLACK.filled())))?;
    root.present()?;
    Ok(())
}

/// `(min - pad, max + pad)` of the values, or the default range when there are none.
fn bounds(v: &[f64], default_lo: f64, default_hi: f64, pad: f64) -> (f64, f64) {
    if v.is_empty() {
        return (default_lo, default_hi);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo - pad, hi + pad.max(1e-6))
}
