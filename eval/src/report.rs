//! The evaluation report: one versioned JSON document (schema in docs/report-schema.md), and
//! the same numbers as Markdown tables and as one self-contained HTML page with inline SVG
//! charts (size vs KL divergence with the Pareto front, per-layer weight error, speed).

use crate::metrics::{Divergence, Summary};
use crate::weights::TensorError;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Bumped whenever a field changes meaning or is removed (adding fields keeps the version).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema_version: u32,
    /// "tandem <version>".
    pub tool: String,
    pub text: TextInfo,
    pub reference: ModelResult,
    /// Candidates, in the order given.
    pub models: Vec<ModelResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextInfo {
    pub path: String,
    pub ctx: usize,
    pub chunks: usize,
    /// Positions scored (per chunk: ctx - 1 - ctx/2).
    pub scored_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelResult {
    /// Short name (file stem).
    pub name: String,
    pub path: String,
    pub size: Size,
    pub ppl: f64,
    /// Against the reference (absent for the reference itself).
    pub quality: Option<Quality>,
    pub speed: Option<Speed>,
    /// Absent for the reference itself.
    pub weights: Option<WeightSummary>,
    /// How tandem's calibrated quantization made the file (`tandem.quantize.*` keys without
    /// the prefix: method, calibration text and its SHA-256, chunks, GPTQ parameters); empty
    /// for anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantized_with: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Size {
    pub bytes: u64,
    pub params: u64,
    pub bits_per_weight: f64,
    /// Share of parameters stored in 16 or more bits.
    pub share_16bit: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub p1: f64,
    pub p99: f64,
    pub max: f64,
}

impl From<Summary> for Stats {
    fn from(s: Summary) -> Self {
        Stats {
            mean: s.mean,
            median: s.median,
            p1: s.p1,
            p99: s.p99,
            max: s.max,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quality {
    /// PPL(candidate) / PPL(reference) on the same positions.
    pub ppl_ratio: f64,
    /// KL(reference || candidate) per position, nats.
    pub kl: Stats,
    /// Share of positions where both models' most likely token is the same.
    pub top1_agreement: f64,
    /// Candidate minus reference probability of the actual next token.
    pub delta_p: Stats,
}

impl Quality {
    pub fn from_divergence(d: &Divergence) -> Self {
        Quality {
            ppl_ratio: d.ppl_candidate() / d.ppl_reference(),
            kl: Summary::of(&d.kl).into(),
            top1_agreement: d.top1_agreement(),
            delta_p: Summary::of(&d.delta_p).into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Speed {
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WeightSummary {
    pub per_kind: Vec<GroupError>,
    pub per_layer: Vec<GroupError>,
    pub tensors: Vec<TensorRow>,
}

/// Parameter-weighted RMS of the relative errors of a group of tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupError {
    /// The kind ("attention", "mlp", ...) or the layer index as text.
    pub group: String,
    pub tensors: usize,
    pub params: u64,
    pub rel_rms_error: f64,
    /// Storage types in the group, e.g. "F16" or "Q4_K, Q5_0".
    pub types: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorRow {
    pub name: String,
    pub kind: String,
    pub layer: Option<usize>,
    pub dtype: String,
    pub params: u64,
    pub rel_rms_error: f64,
}

impl WeightSummary {
    pub fn from_errors(errors: &[TensorError]) -> Self {
        let group = |key: &dyn Fn(&TensorError) -> Option<String>| -> Vec<GroupError> {
            let mut keys: Vec<String> = Vec::new();
            for e in errors {
                if let Some(k) = key(e) {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
            keys.into_iter()
                .map(|k| {
                    let members: Vec<&TensorError> = errors
                        .iter()
                        .filter(|e| key(e).as_deref() == Some(k.as_str()))
                        .collect();
                    let params: u64 = members.iter().map(|e| e.params as u64).sum();
                    let mse: f64 = members
                        .iter()
                        .map(|e| e.params as f64 * e.rel_rms_error.powi(2))
                        .sum::<f64>()
                        / params.max(1) as f64;
                    let mut types: Vec<String> = members.iter().map(|e| e.dtype.clone()).collect();
                    types.sort();
                    types.dedup();
                    GroupError {
                        group: k,
                        tensors: members.len(),
                        params,
                        rel_rms_error: mse.sqrt(),
                        types: types.join(", "),
                    }
                })
                .collect()
        };
        WeightSummary {
            per_kind: group(&|e| Some(e.kind.clone())),
            per_layer: group(&|e| e.layer.map(|l| l.to_string())),
            tensors: errors
                .iter()
                .map(|e| TensorRow {
                    name: e.name.clone(),
                    kind: e.kind.clone(),
                    layer: e.layer,
                    dtype: e.dtype.clone(),
                    params: e.params as u64,
                    rel_rms_error: e.rel_rms_error,
                })
                .collect(),
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl Report {
    /// Candidates on the Pareto front of (size, mean KL): no other candidate is at least as
    /// small and at least as close, and strictly better in one.
    pub fn pareto_front(&self) -> Vec<usize> {
        let pts: Vec<(f64, f64)> = self
            .models
            .iter()
            .map(|m| {
                (
                    m.size.bytes as f64,
                    m.quality.as_ref().map_or(f64::INFINITY, |q| q.kl.mean),
                )
            })
            .collect();
        let mut front: Vec<usize> = (0..pts.len())
            .filter(|&i| {
                !pts.iter().enumerate().any(|(j, p)| {
                    j != i
                        && p.0 <= pts[i].0
                        && p.1 <= pts[i].1
                        && (p.0 < pts[i].0 || p.1 < pts[i].1)
                })
            })
            .collect();
        front.sort_by(|&a, &b| pts[a].0.total_cmp(&pts[b].0));
        front
    }

    /// The Markdown report: a summary table, weight error per kind and per layer.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# tandem eval report\n");
        let _ = writeln!(
            s,
            "Text `{}`: {} chunks of {} tokens, {} scored positions (llama-perplexity's scheme). Reference: `{}`. {}.\n",
            self.text.path, self.text.chunks, self.text.ctx, self.text.scored_tokens, self.reference.path, self.tool
        );
        let _ = writeln!(s, "| model | size MiB | bits/weight | 16-bit share | PPL | PPL ratio | mean KLD | median KLD | p99 KLD | max KLD | top-1 | mean Δp | p1 Δp | p99 Δp | prefill tok/s | decode tok/s |");
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for m in std::iter::once(&self.reference).chain(&self.models) {
            let q = m.quality.as_ref();
            let f = |v: Option<f64>, p: usize| v.map_or("—".to_string(), |v| format!("{v:.p$}"));
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.2} | {:.0}% | {:.4} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.name,
                mib(m.size.bytes),
                m.size.bits_per_weight,
                100.0 * m.size.share_16bit,
                m.ppl,
                f(q.map(|q| q.ppl_ratio), 4),
                f(q.map(|q| q.kl.mean), 5),
                f(q.map(|q| q.kl.median), 5),
                f(q.map(|q| q.kl.p99), 4),
                f(q.map(|q| q.kl.max), 3),
                q.map_or("—".into(), |q| format!("{:.2}%", 100.0 * q.top1_agreement)),
                f(q.map(|q| q.delta_p.mean), 5),
                f(q.map(|q| q.delta_p.p1), 4),
                f(q.map(|q| q.delta_p.p99), 4),
                f(m.speed.as_ref().map(|v| v.prefill_tok_s), 1),
                f(m.speed.as_ref().map(|v| v.decode_tok_s), 1),
            );
        }
        let recorded: Vec<&ModelResult> = self
            .models
            .iter()
            .filter(|m| !m.quantized_with.is_empty())
            .collect();
        if !recorded.is_empty() {
            let _ = writeln!(s, "\n## How the models were quantized\n");
            let _ = writeln!(s, "| model | recorded in the file |");
            let _ = writeln!(s, "|---|---|");
            for m in recorded {
                let parts: Vec<String> = m
                    .quantized_with
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = writeln!(s, "| {} | {} |", m.name, parts.join(", "));
            }
        }
        let front: Vec<&str> = self
            .pareto_front()
            .iter()
            .map(|&i| self.models[i].name.as_str())
            .collect();
        let _ = writeln!(
            s,
            "\nPareto front (size vs mean KLD): {}\n",
            front.join(" → ")
        );
        let kinds = ["embeddings", "attention", "mlp", "output"];
        let _ = writeln!(s, "## Weight error ‖W−Ŵ‖/‖W‖ per kind\n");
        let _ = writeln!(s, "| model | {} |", kinds.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(kinds.len()));
        for m in &self.models {
            let Some(w) = &m.weights else { continue };
            let cells: Vec<String> = kinds
                .iter()
                .map(|k| {
                    w.per_kind
                        .iter()
                        .find(|g| g.group == *k)
                        .map_or("—".into(), |g| {
                            format!("{:.4} ({})", g.rel_rms_error, g.types)
                        })
                })
                .collect();
            let _ = writeln!(s, "| {} | {} |", m.name, cells.join(" | "));
        }
        let _ = writeln!(s, "\n## Weight error per layer\n");
        let _ = writeln!(
            s,
            "| layer | {} |",
            self.models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "---:|".repeat(self.models.len()));
        let layers = self
            .models
            .iter()
            .filter_map(|m| m.weights.as_ref())
            .map(|w| w.per_layer.len())
            .max()
            .unwrap_or(0);
        for l in 0..layers {
            let cells: Vec<String> = self
                .models
                .iter()
                .map(|m| {
                    m.weights
                        .as_ref()
                        .and_then(|w| w.per_layer.iter().find(|g| g.group == l.to_string()))
                        .map_or("—".into(), |g| format!("{:.4}", g.rel_rms_error))
                })
                .collect();
            let _ = writeln!(s, "| {l} | {} |", cells.join(" | "));
        }
        s
    }

    /// One self-contained HTML page: inline SVG charts and the tables, no scripts, no network.
    pub fn html(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>tandem eval report</title><style>\
             body{{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}}\
             table{{border-collapse:collapse;font-size:13px;margin:8px 0 24px}}\
             td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th{{background:#eee}}\
             td:first-child,th:first-child{{text-align:left}}h2{{margin-top:28px}}\
             .charts{{display:flex;flex-wrap:wrap;gap:18px}}</style></head><body>"
        );
        let _ = write!(s, "<h1>tandem eval report</h1><p>Text <code>{}</code>: {} chunks of {} tokens, {} scored positions. Reference <code>{}</code>. {}.</p>",
            esc(&self.text.path), self.text.chunks, self.text.ctx, self.text.scored_tokens, esc(&self.reference.path), esc(&self.tool));
        let _ = write!(
            s,
            "<div class=\"charts\">{}{}{}</div>",
            self.scatter_svg(),
            self.layer_svg(),
            self.speed_svg()
        );
        // Tables: the Markdown ones, rendered.
        let md = self.markdown();
        let mut in_table = false;
        // The first lines (title, text description) are already in the page header.
        for line in md.lines().skip(3) {
            if let Some(h) = line.strip_prefix("## ") {
                let _ = write!(s, "<h2>{}</h2>", esc(h));
            } else if line.starts_with('|') {
                if line.starts_with("|---") {
                    continue;
                }
                let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
                if !in_table {
                    s.push_str("<table><tr>");
                    for c in &cells {
                        let _ = write!(s, "<th>{}</th>", esc(c));
                    }
                    s.push_str("</tr>");
                    in_table = true;
                } else {
                    s.push_str("<tr>");
                    for c in &cells {
                        let _ = write!(s, "<td>{}</td>", esc(c));
                    }
                    s.push_str("</tr>");
                }
            } else {
                if in_table {
                    s.push_str("</table>");
                    in_table = false;
                }
                if !line.trim().is_empty() {
                    let _ = write!(s, "<p>{}</p>", esc(line));
                }
            }
        }
        if in_table {
            s.push_str("</table>");
        }
        s.push_str("</body></html>\n");
        s
    }

    fn scatter_svg(&self) -> String {
        let (w, h, l, r, t, b) = (560.0, 380.0, 70.0, 20.0, 30.0, 50.0);
        let pts: Vec<(f64, f64, &str)> = self
            .models
            .iter()
            .filter_map(|m| {
                Some((
                    mib(m.size.bytes),
                    m.quality.as_ref()?.kl.mean.max(1e-6),
                    m.name.as_str(),
                ))
            })
            .collect();
        let mut s = svg_open(w, h, "Size vs mean KL divergence (lower left is better)");
        if pts.is_empty() {
            return s + "</svg>";
        }
        let (x0, x1) = span(pts.iter().map(|p| p.0).chain([0.0]));
        let (y0, y1) = (
            pts.iter()
                .map(|p| p.1.log10())
                .fold(f64::INFINITY, f64::min)
                .floor(),
            pts.iter()
                .map(|p| p.1.log10())
                .fold(f64::NEG_INFINITY, f64::max)
                .ceil()
                .max(-5.0),
        );
        let y1 = if y1 <= y0 { y0 + 1.0 } else { y1 };
        let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
        let py = |y: f64| t + (y1 - y.log10()) / (y1 - y0) * (h - t - b);
        axes(&mut s, w, h, l, r, t, b, "size (MiB)", "mean KLD (log)");
        for i in 0..=4 {
            let x = x0 + (x1 - x0) * i as f64 / 4.0;
            let digits = if x1 < 10.0 { 2 } else { 0 };
            let _ = write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{x:.digits$}</text>", px(x), h - b + 16.0);
        }
        let mut e = y0;
        while e <= y1 + 1e-9 {
            let _ = write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">1e{e:.0}</text><line x1=\"{l}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
                l - 4.0, py(10f64.powf(e)) + 4.0, w - r, py(10f64.powf(e)), py(10f64.powf(e)));
            e += 1.0;
        }
        let front = self.pareto_front();
        let poly: Vec<String> = front
            .iter()
            .filter_map(|&i| {
                let q = self.models[i].quality.as_ref()?;
                Some(format!(
                    "{:.1},{:.1}",
                    px(mib(self.models[i].size.bytes)),
                    py(q.kl.mean.max(1e-6))
                ))
            })
            .collect();
        let _ = write!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/>", poly.join(" "));
        for (i, (x, y, name)) in pts.iter().enumerate() {
            let on = front.contains(&i);
            // Labels near the right edge go to the left of their point.
            let (lx, anchor) = if px(*x) > w - r - 90.0 {
                (px(*x) - 8.0, "end")
            } else {
                (px(*x) + 8.0, "start")
            };
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"6\" fill=\"{}\"/><text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"{anchor}\">{}</text>",
                px(*x), py(*y), if on { "#d62728" } else { "#1f77b4" }, py(*y) - 8.0 - 12.0 * (i % 2) as f64, esc(name));
        }
        let _ = write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"#d62728\">red: Pareto front</text>", w - r - 110.0, t + 12.0);
        s + "</svg>"
    }

    fn layer_svg(&self) -> String {
        let (w, h, l, r, t, b) = (560.0, 380.0, 70.0, 20.0, 30.0, 50.0);
        let mut s = svg_open(w, h, "Weight error per layer (‖W−Ŵ‖/‖W‖)");
        let series: Vec<(&str, Vec<f64>)> = self
            .models
            .iter()
            .filter_map(|m| {
                Some((
                    m.name.as_str(),
                    m.weights
                        .as_ref()?
                        .per_layer
                        .iter()
                        .map(|g| g.rel_rms_error)
                        .collect(),
                ))
            })
            .collect();
        let n = series.iter().map(|s| s.1.len()).max().unwrap_or(0);
        if n == 0 {
            return s + "</svg>";
        }
        let (_, ymax) = span(series.iter().flat_map(|s| s.1.iter().copied()).chain([0.0]));
        let px = |i: usize| l + i as f64 / (n.max(2) - 1) as f64 * (w - l - r);
        let py = |y: f64| t + (1.0 - y / ymax) * (h - t - b);
        axes(&mut s, w, h, l, r, t, b, "layer", "rel. RMS error");
        for i in 0..=4 {
            let y = ymax * i as f64 / 4.0;
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{y:.3}</text>",
                l - 4.0,
                py(y) + 4.0
            );
        }
        for i in (0..n).step_by((n / 10).max(1)) {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{i}</text>",
                px(i),
                h - b + 16.0
            );
        }
        for (k, (name, ys)) in series.iter().enumerate() {
            let c = COLORS[k % COLORS.len()];
            let pts: Vec<String> = ys
                .iter()
                .enumerate()
                .map(|(i, y)| format!("{:.1},{:.1}", px(i), py(*y)))
                .collect();
            let _ = write!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" fill=\"{c}\">{}</text>",
                pts.join(" "), l + 10.0, t + 14.0 + 14.0 * k as f64, esc(name));
        }
        s + "</svg>"
    }

    fn speed_svg(&self) -> String {
        let rows: Vec<(&str, f64, f64)> = std::iter::once(&self.reference)
            .chain(&self.models)
            .filter_map(|m| {
                Some((
                    m.name.as_str(),
                    m.speed.as_ref()?.prefill_tok_s,
                    m.speed.as_ref()?.decode_tok_s,
                ))
            })
            .collect();
        let (w, l, r, t) = (560.0, 150.0, 70.0, 34.0);
        let h = t + 20.0 + rows.len() as f64 * 44.0;
        let mut s = svg_open(w, h, "Speed on this machine (tok/s): prefill, decode");
        let max = rows.iter().flat_map(|r| [r.1, r.2]).fold(1e-9, f64::max);
        for (i, (name, pp, tg)) in rows.iter().enumerate() {
            let y = t + i as f64 * 44.0;
            let bw = |v: f64| v / max * (w - l - r);
            let _ = write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}</text>\
                <rect x=\"{l}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"16\" fill=\"#9ecae1\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{pp:.0} pp</text>\
                <rect x=\"{l}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" fill=\"#3182bd\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{tg:.0} tg</text>",
                l - 6.0, y + 22.0, esc(name), bw(*pp), l + bw(*pp) + 4.0, y + 12.0, y + 18.0, bw(*tg), l + bw(*tg) + 4.0, y + 30.0);
        }
        s + "</svg>"
    }
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn svg_open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" style=\"background:#fff;border:1px solid #ddd\">\
         <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        esc(title)
    )
}

#[allow(clippy::too_many_arguments)]
fn axes(s: &mut String, w: f64, h: f64, l: f64, r: f64, t: f64, b: f64, xl: &str, yl: &str) {
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\" stroke=\"#333\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\
         <text x=\"14\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
        h - b, w - r, h - b, h - b, (l + w - r) / 2.0, h - 12.0, esc(xl), (t + h - b) / 2.0, (t + h - b) / 2.0, esc(yl)
    );
}

/// (min, max) of an iterator, widened to a non-empty range.
fn span(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in xs {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi * 1.05)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, record: Vec<(String, String)>) -> ModelResult {
        ModelResult {
            name: name.into(),
            path: format!("{name}.gguf"),
            size: Size {
                bytes: 1 << 20,
                params: 1 << 20,
                bits_per_weight: 8.0,
                share_16bit: 0.0,
            },
            ppl: 10.0,
            quality: None,
            speed: None,
            weights: None,
            quantized_with: record,
        }
    }

    #[test]
    fn the_quantization_record_reaches_json_markdown_and_html() {
        let record = vec![
            ("method".to_string(), "gptq".to_string()),
            ("calibration.sha256".to_string(), "ab12".to_string()),
        ];
        let r = Report {
            schema_version: SCHEMA_VERSION,
            tool: "tandem test".into(),
            text: TextInfo {
                path: "t.txt".into(),
                ctx: 512,
                chunks: 1,
                scored_tokens: 255,
            },
            reference: model("f16", Vec::new()),
            models: vec![
                model("q4_0-gptq", record.clone()),
                model("q4_0", Vec::new()),
            ],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains("\"quantized_with\":[[\"method\",\"gptq\"]"),
            "{json}"
        );
        // Files without a record keep the old shape (the field is optional).
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let md = r.markdown();
        assert!(
            md.contains("| q4_0-gptq | method=gptq, calibration.sha256=ab12 |"),
            "{md}"
        );
        assert!(r.html().contains("method=gptq, calibration.sha256=ab12"));
    }
}
