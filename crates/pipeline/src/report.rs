//! What a run adds up to: Table I (Markdown and CSV), the methods' scores with bootstrap
//! confidence intervals (Markdown and CSV), the alpha-sweep plot, and `report.html`, one file
//! with every figure embedded (no scripts, no outside links), readable in any browser and safe to
//! mail.

use crate::error::{Error, Result};
use crate::plot::{alpha_sweep_svg, Series};
use crate::rows::{Found, Outcome, ResultRow as Row};
use crate::schema::{Measure, Pipeline};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use vulnmap_saliency::metrics::bootstrap::mean_interval;

/// The row's image index as a table cell (`null` for dataset-level rows).
fn image_cell(row: &Row) -> String {
    row.image.map_or_else(|| "null".into(), |i| i.to_string())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A table: header and rows of cells, written as Markdown, CSV or HTML.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }

    fn csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let csv_error = |e: csv::Error| Error::Run(format!("writing CSV: {e}"));
        w.write_record(&self.header).map_err(csv_error)?;
        for r in &self.rows {
            w.write_record(r).map_err(csv_error)?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| Error::Run(format!("writing CSV: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn html(&self) -> String {
        let mut out = String::from("<table><thead><tr>");
        for h in &self.header {
            let _ = write!(out, "<th>{}</th>", escape(h));
        }
        out.push_str("</tr></thead><tbody>");
        for r in &self.rows {
            out.push_str("<tr>");
            for c in r {
                let _ = write!(out, "<td>{}</td>", escape(c));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table>");
        out
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// Table I of the paper: one row per attack outcome.
fn table1(rows: &[Row]) -> Table {
    let mut t = Table::new(&[
        "image",
        "step",
        "alpha",
        "origin loss",
        "final loss",
        "label change",
        "iterations",
        "confidence",
        "success",
    ]);
    for r in rows {
        let Some(o) = r.outcome() else { continue };
        let label = |class: usize, name: &str| {
            if name.is_empty() {
                class.to_string()
            } else {
                format!("{class} ({name})")
            }
        };
        let finite = |v: f64| v.is_finite().then_some(v);
        t.rows.push(vec![
            image_cell(r),
            r.step.clone(),
            fmt(finite(o.alpha), 3),
            finite(o.origin_loss).map_or("-".into(), |v| format!("{v:.3e}")),
            fmt(finite(o.final_loss), 4),
            format!(
                "from {} to {}",
                label(o.label_from, &o.name_from),
                label(o.label_to, &o.name_to)
            ),
            o.iterations.to_string(),
            fmt(finite(o.confidence), 4),
            o.success.to_string(),
        ]);
    }
    t
}

/// Each attack step's mean iterations and success rate, with its random-mask controls.
fn attack_summary(rows: &[Row]) -> Table {
    let mut t = Table::new(&[
        "step",
        "attack",
        "attacks",
        "success rate",
        "mean iterations (successes)",
    ]);
    let mut groups: BTreeMap<(String, String), (usize, usize, Vec<f64>)> = BTreeMap::new();
    let mut add = |step: &str, what: &str, o: &Outcome| {
        let g = groups
            .entry((step.to_string(), what.to_string()))
            .or_default();
        g.0 += 1;
        if o.success {
            g.1 += 1;
            g.2.push(o.iterations as f64);
        }
    };
    for r in rows {
        if let Some(o) = r.outcome() {
            add(&r.step, &r.kind().name(), o);
        }
        if let Found::SaliencyAttack(a) = &r.found {
            for (name, o) in &a.controls {
                add(&r.step, &format!("control: {name} mask"), o);
            }
        }
    }
    for ((step, what), (n, ok, its)) in groups {
        t.rows.push(vec![
            step,
            what,
            n.to_string(),
            format!("{:.2}", ok as f64 / n.max(1) as f64),
            fmt(mean(&its), 1),
        ]);
    }
    t
}

/// Mean scores of each scored map-making step with 95% bootstrap intervals over the images, and
/// its mean seconds per map: the table to read (`mean [low, high]`) and the one to compute with
/// (mean, low and high columns). Where several metrics steps score the same maps (a pointing
/// game at two tolerances), each gets its own rows, `map (metrics step)`: one step's scores are
/// never averaged with another's.
fn metrics(rows: &[Row]) -> Result<(Table, Table)> {
    // Per row of the table: the map-making step and its scores by measure.
    type Scored<'a> = (&'a str, BTreeMap<Measure, Vec<f64>>);
    let mut by_step: BTreeMap<String, Scored> = BTreeMap::new();
    let mut seconds: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| !matches!(r.found, Found::Metrics(_)))
    {
        seconds.entry(&r.step).or_default().push(r.seconds);
    }
    let metrics_steps: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|r| matches!(r.found, Found::Metrics(_)))
        .map(|r| r.step.as_str())
        .collect();
    for r in rows {
        let Found::Metrics(scored) = &r.found else {
            continue;
        };
        for (step, scores) in &scored.scores {
            let label = match metrics_steps.len() {
                1 => step.clone(),
                _ => format!("{step} ({})", r.step),
            };
            let (_, entry) = by_step
                .entry(label)
                .or_insert_with(|| (step.as_str(), BTreeMap::new()));
            for m in Measure::ALL {
                if let Some(x) = scores.get(m).filter(|x| !x.is_nan()) {
                    entry.entry(m).or_default().push(x);
                }
            }
        }
    }
    // Only the measures some map was scored by.
    let used: Vec<Measure> = Measure::ALL
        .into_iter()
        .filter(|m| by_step.values().any(|(_, scores)| scores.contains_key(m)))
        .collect();
    let mut header = vec!["method".to_string(), "images".to_string()];
    header.extend(used.iter().map(|m| format!("{} [95% CI]", m.title())));
    header.push("seconds per map".into());
    let mut shown = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    let mut header = vec!["method".to_string(), "images".to_string()];
    for m in &used {
        let name = m.name();
        header.extend([
            name.clone(),
            format!("{name}_ci_low"),
            format!("{name}_ci_high"),
        ]);
    }
    header.push("seconds_per_map".into());
    let mut numbers = Table::new(&header.iter().map(String::as_str).collect::<Vec<_>>());
    for (label, (step, m)) in by_step {
        let n = m.values().map(Vec::len).max().unwrap_or(0);
        let per_map = seconds.get(step).and_then(|v| mean(v));
        let mut cells = vec![label.clone(), n.to_string()];
        let mut columns = vec![label, n.to_string()];
        for k in &used {
            match m.get(k).filter(|v| !v.is_empty()) {
                Some(v) => {
                    let i = mean_interval(v, 0.95, BOOTSTRAP_RESAMPLES, 0)?;
                    cells.push(format!("{:.3} [{:.3}, {:.3}]", i.mean, i.low, i.high));
                    columns.extend([i.mean, i.low, i.high].map(|x| format!("{x:.6}")));
                }
                None => {
                    cells.push("-".into());
                    columns.extend(["-".to_string(), "-".into(), "-".into()]);
                }
            }
        }
        cells.push(fmt(per_map, 3));
        columns.push(fmt(per_map, 6));
        shown.rows.push(cells);
        numbers.rows.push(columns);
    }
    Ok((shown, numbers))
}

/// Resamples of the bootstrap intervals in the scores table.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Mean over images of each alpha's mean iterations, per alpha-sweep step.
fn sweeps(rows: &[Row]) -> Vec<(String, Vec<Series>)> {
    let mut by_step: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for r in rows {
        let Found::AlphaSweep(swept) = &r.found else {
            continue;
        };
        let points: Vec<(f64, f64)> = swept
            .sweep
            .iter()
            .filter_map(|p| {
                // Unsuccessful alphas count as the cap (shown as the max iterations).
                let its = if p.stats.successes == 0 {
                    p.stats.max_iterations as f64
                } else {
                    p.stats.mean_iterations
                };
                (p.alpha.is_finite() && its.is_finite()).then_some((p.alpha, its))
            })
            .collect();
        by_step.entry(r.step.clone()).or_default().push(Series {
            label: format!(
                "image {} ({})",
                image_cell(r),
                Path::new(r.file.as_deref().unwrap_or(""))
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            points,
        });
    }
    by_step.into_iter().collect()
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An `<img>` with the file's bytes inlined, or nothing when the file is missing.
fn image(dir: &Path, relative: &str, caption: &str, mime: &str) -> String {
    match std::fs::read(dir.join(relative)) {
        Ok(bytes) => format!(
            "<figure><img src=\"data:{mime};base64,{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
            base64(&bytes),
            escape(caption),
            escape(caption)
        ),
        Err(_) => String::new(),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left}\
th{background:#f3f3f3}figure{display:inline-block;margin:0.3em;text-align:center}\
figure img{width:160px;height:160px;image-rendering:pixelated;display:block}figcaption{font-size:0.75em;max-width:160px}\
.plot img{width:640px;height:auto}.image-row{border-top:1px solid #eee;padding:0.5em 0}";

/// Writes the tables, the plots and `report.html` into `dir`; returns the report's path.
pub(crate) fn write(dir: &Path, pipeline: &Pipeline, rows: &[Row]) -> Result<PathBuf> {
    let write =
        |name: &str, text: &str| vulnmap_data::fs::write_atomic(&dir.join(name), text.as_bytes());
    let t1 = table1(rows);
    let summary = attack_summary(rows);
    let (scores, score_numbers) = metrics(rows)?;
    if !t1.rows.is_empty() {
        write("table1.md", &t1.markdown())?;
        write("table1.csv", &t1.csv()?)?;
    }
    if !scores.rows.is_empty() {
        write("metrics.md", &scores.markdown())?;
        write("metrics.csv", &score_numbers.csv()?)?;
    }
    let mut html = String::new();
    let title = escape(&pipeline.name);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>vulnmap: {title}</title><style>{STYLE}</style></head><body>\n<h1>vulnmap: {title}</h1>\n"
    );
    if !pipeline.description.is_empty() {
        let _ = writeln!(html, "<p>{}</p>", escape(&pipeline.description));
    }
    let images: std::collections::BTreeSet<usize> = rows.iter().filter_map(|r| r.image).collect();
    let model = pipeline
        .model
        .as_ref()
        .map(|m| {
            format!(
                "{} ({})",
                m.name(),
                m.weights
                    .as_deref()
                    .map(|w| Path::new(w)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default())
                    .unwrap_or_else(|| "hub default".into())
            )
        })
        .unwrap_or_else(|| "tiny-resnet trained on the synthetic fundus benchmark".into());
    let steps: Vec<String> = pipeline.steps.iter().map(|s| s.kind().name()).collect();
    let _ = writeln!(
        html,
        "<p>Model: {}. Images: {}. Steps: {}. Result rows: {}.</p>",
        escape(&model),
        images.len(),
        escape(&steps.join(", ")),
        rows.len()
    );

    let labelled: Vec<bool> = rows
        .iter()
        .filter_map(|r| match &r.found {
            Found::Classify(c) => c.correct,
            _ => None,
        })
        .collect();
    if !labelled.is_empty() {
        let correct = labelled.iter().filter(|&&c| c).count();
        let _ = writeln!(
            html,
            "<h2>Classification</h2><p>Accuracy {:.3} ({correct} of {}).</p>",
            correct as f64 / labelled.len() as f64,
            labelled.len()
        );
    }
    for r in rows {
        if let Found::Finetune(f) = &r.found {
            let accuracy = f.report.test_accuracy;
            let _ = writeln!(
                html,
                "<h2>Fine-tuning</h2><p>Best epoch {}, test accuracy {}.</p>",
                f.report.best_epoch,
                fmt(accuracy.is_finite().then_some(accuracy), 3)
            );
        }
    }
    if !scores.rows.is_empty() {
        let _ = writeln!(html, "<h2>Saliency maps scored</h2><p>Pointing game: the map's maximum within 15 px of a lesion; AUROC and IoU of the map against the lesion mask; deletion and insertion: the target probability as the most salient pixels are removed or restored (area under the curve, RISE's protocol); sparseness and complexity: how concentrated the map is. Each cell is the mean over the images and its 95% bootstrap interval.</p>{}", scores.html());
    }
    if !summary.rows.is_empty() {
        let _ = writeln!(html, "<h2>Attacks</h2>{}", summary.html());
    }
    if !t1.rows.is_empty() {
        let _ = writeln!(html, "<h2>Table I</h2>{}", t1.html());
    }
    for (step, series) in sweeps(rows) {
        let svg = alpha_sweep_svg(&format!("alpha sweep ({step})"), &series)?;
        let name = format!("alpha_sweep_{step}.svg");
        write(&name, &svg)?;
        let _ = writeln!(
            html,
            "<h2>Alpha sweep: {}</h2><div class=\"plot\">{}</div>",
            escape(&step),
            image(
                dir,
                &name,
                "iterations to flip against alpha",
                "image/svg+xml"
            )
        );
    }

    // Figures of the first images: the input, then every figure of every step.
    let mut by_image: BTreeMap<usize, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        if let Some(i) = r.image {
            by_image.entry(i).or_default().push(r);
        }
    }
    let mut shown = 0;
    let mut figures = String::new();
    for (index, image_rows) in by_image {
        if shown == pipeline.outputs.report_images {
            break;
        }
        let mut cells = String::new();
        let file = image_rows[0].file.as_deref().unwrap_or("");
        let input = image_rows
            .iter()
            .find_map(|r| {
                r.map()
                    .and_then(|m| m.map_figure.as_deref())
                    .or(r.attack_figures().and_then(|f| f.noise_figure.as_deref()))
            })
            .and_then(|p| p.rsplit_once('/'))
            .map(|(folder, _)| format!("{folder}/input.png"));
        if let Some(input) = input {
            cells.push_str(&image(dir, &input, "input", "image/png"));
        }
        for r in &image_rows {
            let step = &r.step;
            let overlay = r.map().and_then(|m| m.overlay_figure.as_deref());
            let attack = r.attack_figures();
            let noise = attack.and_then(|f| f.noise_figure.as_deref());
            let perturbed = attack.and_then(|f| f.perturbed_figure.as_deref());
            if let Some(p) = overlay {
                cells.push_str(&image(dir, p, step, "image/png"));
            }
            if let Some(p) = noise {
                cells.push_str(&image(dir, p, &format!("{step} noise"), "image/png"));
            }
            if let Some(p) = perturbed {
                let mut caption = format!("{step} perturbed");
                if let Some(o) = r.outcome() {
                    let _ = write!(caption, ": {} iterations", o.iterations);
                }
                cells.push_str(&image(dir, p, &caption, "image/png"));
            }
        }
        if !cells.is_empty() {
            let _ = writeln!(
                figures,
                "<div class=\"image-row\"><h3>Image {index}: {}</h3>{cells}</div>",
                escape(file)
            );
            shown += 1;
        }
    }
    if !figures.is_empty() {
        let _ = writeln!(html, "<h2>Figures</h2>{figures}");
    }
    html.push_str("<p><small>Written by vulnmap. Every row is in results.jsonl; Table I and the scores are also in CSV beside this file.</small></p></body></html>\n");
    let path = dir.join("report.html");
    write("report.html", &html)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), coded);
        }
    }
}
