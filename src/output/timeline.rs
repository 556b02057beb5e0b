//! The memory timeline of a training step as a picture: an SVG chart ([`svg`]) and a
//! self-contained HTML page around it ([`html`]).
//!
//! The chart stacks the predicted trace's allocated bytes by [`Category`] (one fixed colour
//! each, [`color`]) over the step, and overlays what is given besides: the allocator
//! simulation's reserved bytes, a measured trace's allocated total, the capacity line, the
//! event where memory runs out, and the estimator's phase points.
//!
//! The x axis is the step's progress by section. Every section (from one `Begin` mark to the
//! next `Begin` or the `End`) gets the same width, and its events are spread evenly within
//! it. Each trace is placed by its own sections, so a measured trace with a hundred times
//! the events of the predicted one still lines up with it section by section. A trace of up
//! to millions of events is cut to at most [`MAX_POINTS`] x positions, each keeping the
//! state with the highest total of its bucket, so the peak is never lost.
//!
//! Drawn with `plotters`' SVG backend. Text is written as SVG `<text>` elements, which the
//! viewer lays out with its own fonts; no font is read here.

use std::fmt::Write as _;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::trace::{Category, MarkKind, Op, Section, Trace};
use crate::units::Bytes;

/// Width of the SVG picture in pixels.
pub const WIDTH: u32 = 1200;
/// Height of the SVG picture in pixels.
pub const HEIGHT: u32 = 640;
/// Most x positions drawn per trace.
pub const MAX_POINTS: usize = 2000;

/// Fill colours of the categories, in [`Category::ALL`] order (RGB).
pub const PALETTE: [(u8, u8, u8); 12] = [
    (31, 119, 180),  // master params: blue
    (174, 199, 232), // unsharded params: light blue
    (255, 127, 14),  // gradients: orange
    (255, 187, 120), // gradient buffers: light orange
    (44, 160, 44),   // optimizer states: green
    (152, 223, 138), // optimizer temporaries: light green
    (148, 103, 189), // activations: purple
    (197, 176, 213), // backward working set: light purple
    (140, 86, 75),   // logits: brown
    (196, 156, 148), // workspace: light brown
    (227, 119, 194), // inputs and rotary table: pink
    (127, 127, 127), // other: grey
];
/// The capacity line.
pub const CAPACITY_COLOR: (u8, u8, u8) = (214, 39, 40);
/// The out-of-memory line.
pub const OOM_COLOR: (u8, u8, u8) = (128, 0, 0);
/// The simulated reserved bytes.
pub const RESERVED_COLOR: (u8, u8, u8) = (23, 190, 207);
/// The measured trace's allocated total.
pub const MEASURED_COLOR: (u8, u8, u8) = (0, 0, 128);
/// Phase point markers.
const POINT_COLOR: (u8, u8, u8) = (60, 60, 60);

const LEGEND_WIDTH: u32 = 230;
const FONT: &str = "sans-serif";

/// A font of `px` pixels: plotters' SVG backend writes `font-size` as the size given / 1.24.
fn font(px: f64) -> FontDesc<'static> {
    (FONT, px * 1.24).into_font()
}

/// Roughly how wide a text of `px` pixels is (sans-serif averages about 0.55 em a character).
fn text_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * px * 0.55
}

/// The fill colour of a category.
pub fn color(c: Category) -> (u8, u8, u8) {
    PALETTE[c.index()]
}

/// What to draw.
pub struct Chart<'a> {
    pub title: String,
    /// Stacked by category over the step.
    pub predicted: &'a Trace,
    /// Simulated reserved bytes after each predicted event, drawn as a line.
    pub reserved: Option<&'a [u64]>,
    /// A measured trace, overlaid as a line of its allocated total.
    pub measured: Option<&'a Trace>,
    /// A horizontal line, labelled.
    pub capacity_bytes: Option<u64>,
    /// The predicted event at which memory runs out: a vertical line, "out of memory".
    pub oom_at: Option<usize>,
    /// Rows of the HTML page's table: component and its bytes at the peak.
    pub breakdown: Vec<(String, u64)>,
}

/// The chart as an SVG document of [`WIDTH`] x [`HEIGHT`] pixels.
pub fn svg(chart: &Chart) -> Result<String> {
    Ok(render(chart, true)?.0)
}

/// A self-contained HTML page: title, the SVG inline (its title is the page's heading),
/// notes, and the breakdown table. It loads nothing and runs no script.
pub fn html(chart: &Chart) -> Result<String> {
    let (svg, notes) = render(chart, false)?;
    let title = escape(&chart.title);
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{title}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 16px 24px; color: #222; background: #fff; }}\n\
         h1 {{ font-size: 20px; }}\n\
         figure {{ margin: 0; }}\n\
         table {{ border-collapse: collapse; margin-top: 12px; }}\n\
         th, td {{ padding: 3px 12px; border-bottom: 1px solid #ddd; }}\n\
         td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}\n\
         .note {{ color: #555; }}\n\
         </style>\n</head>\n<body>\n<h1>{title}</h1>\n<figure>\n{svg}\n</figure>\n"
    );
    for n in &notes {
        let _ = writeln!(page, "<p class=\"note\">{}</p>", escape(n));
    }
    if !chart.breakdown.is_empty() {
        let total = chart
            .breakdown
            .iter()
            .try_fold(Bytes::ZERO, |t, (_, b)| t.add(Bytes(*b), "breakdown total"))?;
        page.push_str(
            "<table>\n<caption>breakdown at the peak</caption>\n\
             <tr><th>component</th><th>bytes</th><th>share</th></tr>\n",
        );
        for (name, b) in &chart.breakdown {
            let share = if total.0 == 0 {
                0.0
            } else {
                *b as f64 / total.0 as f64 * 100.0
            };
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{share:.1}%</td></tr>",
                escape(name),
                Bytes(*b)
            );
        }
        let _ = writeln!(
            page,
            "<tr><th>total</th><td class=\"n\"><b>{total}</b></td><td class=\"n\">100.0%</td></tr>\n</table>"
        );
    }
    page.push_str("</body>\n</html>\n");
    Ok(page)
}

// ---------------------------------------------------------------------------------------
// Layout: sections on the x axis.

/// One section of a trace: x from its position to the next, events `from..to`.
#[derive(Clone, Debug, PartialEq)]
struct Span {
    /// None: events outside any Begin..End section.
    section: Option<(Section, u64)>,
    first_step: bool,
    from: usize,
    to: usize,
    /// Where the state after each of its events lies, from 0 to 1 (`to - from + 1`
    /// values; [`weigh`] fills them).
    at: Vec<f64>,
}

/// Spreads each section's events by weight: every event counts one, plus its share of the
/// section's squared bytes, scaled to count as much as all the events together. So a
/// section's many small tensors and its few largest ones (the logits, the optimizer's
/// temporaries) both get room: with even spacing, a peak of a few events would be a line.
fn weigh(trace: &Trace, spans: &mut [Span]) {
    for s in spans.iter_mut() {
        let n = s.to - s.from;
        let sq = |e: &crate::trace::Event| (e.bytes as f64).powi(2);
        let bytes: f64 = trace.events[s.from..s.to].iter().map(sq).sum();
        let scale = if bytes > 0.0 { n as f64 / bytes } else { 0.0 };
        let mut acc = 0.0;
        s.at = Vec::with_capacity(n + 1);
        s.at.push(0.0);
        for e in &trace.events[s.from..s.to] {
            acc += 1.0 + sq(e) * scale;
            s.at.push(acc);
        }
        if acc > 0.0 {
            s.at.iter_mut().for_each(|x| *x /= acc);
        }
    }
}

/// The sections of a trace, in order, covering all its events. Errors when marks are out of
/// order or past the last event.
fn spans(trace: &Trace) -> Result<Vec<Span>> {
    let len = trace.events.len();
    let mut out = vec![];
    let mut open: Option<Span> = None;
    let mut covered = 0;
    let mut last_at = 0;
    for (i, m) in trace.marks.iter().enumerate() {
        if m.at > len || m.at < last_at {
            return Err(Error::input(format!(
                "trace mark {i} at event {}: marks must be in order and within the {len} events \
                 (the previous mark is at {last_at})",
                m.at
            )));
        }
        last_at = m.at;
        let begin = match m.kind {
            MarkKind::Begin { section, micro } => Some((section, micro)),
            MarkKind::End => None,
            MarkKind::Point { .. } => continue,
        };
        if let Some(mut s) = open.take() {
            s.to = m.at;
            out.push(s);
            covered = m.at;
        } else if m.at > covered {
            out.push(Span {
                section: None,
                first_step: m.first_step,
                from: covered,
                to: m.at,
                at: vec![],
            });
            covered = m.at;
        }
        open = begin.map(|section| Span {
            section: Some(section),
            first_step: m.first_step,
            from: m.at,
            to: m.at,
            at: vec![],
        });
    }
    if let Some(mut s) = open {
        s.to = len;
        out.push(s);
    } else if covered < len || out.is_empty() {
        out.push(Span {
            section: None,
            first_step: true,
            from: covered,
            to: len,
            at: vec![],
        });
    }
    weigh(trace, &mut out);
    Ok(out)
}

/// The label of a section: the step it begins, if it begins one ("step 1", "steady step"),
/// its name ("forward", "backward 2") and a short name ("F", "B2") for narrow sections.
/// Micro-batches count from 1 in labels (from 0 in marks).
#[derive(Clone, Debug, Default, PartialEq)]
struct Label {
    step: Option<&'static str>,
    name: String,
    short: String,
}

impl Label {
    fn full(&self) -> String {
        match self.step {
            Some(step) => format!("{step} {}", self.name),
            None => self.name.clone(),
        }
    }
}

fn labels(spans: &[Span]) -> Vec<Label> {
    let many = spans
        .iter()
        .any(|s| matches!(s.section, Some((Section::Forward | Section::Backward, m)) if m > 0));
    let mut step: Option<bool> = None;
    spans
        .iter()
        .map(|s| {
            let Some((section, micro)) = s.section else {
                return Label::default();
            };
            let num = match section {
                Section::Forward | Section::Backward if many => format!("{}", micro + 1),
                _ => String::new(),
            };
            let short = match section {
                Section::Setup => "S".to_string(),
                Section::Forward => format!("F{num}"),
                Section::Backward => format!("B{num}"),
                Section::Optimizer => "O".to_string(),
            };
            let mut name = section.name().to_string();
            if !num.is_empty() {
                name = format!("{name} {num}");
            }
            let mut prefix = None;
            if section != Section::Setup && step != Some(s.first_step) {
                step = Some(s.first_step);
                prefix = Some(if s.first_step {
                    "step 1"
                } else {
                    "steady step"
                });
            }
            Label {
                step: prefix,
                name,
                short,
            }
        })
        .collect()
}

/// Calls `visit(x, a)` for the state after the first `a` events, for every state in order
/// (a section without events: its one state at both ends).
fn walk(spans: &[Span], mut visit: impl FnMut(f64, usize) -> Result<()>) -> Result<()> {
    for (i, s) in spans.iter().enumerate() {
        let n = s.to - s.from;
        if n == 0 {
            visit(i as f64, s.from)?;
            visit(i as f64 + 1.0, s.from)?;
            continue;
        }
        for a in s.from..=s.to {
            visit(i as f64 + s.at[a - s.from], a)?;
        }
    }
    Ok(())
}

/// How many times [`walk`] visits.
fn visits(spans: &[Span]) -> usize {
    spans.iter().map(|s| (s.to - s.from + 1).max(2)).sum()
}

/// The x of the state after the first `a` events.
fn x_of(spans: &[Span], a: usize) -> f64 {
    for (i, s) in spans.iter().enumerate() {
        if s.from <= a && a <= s.to {
            let n = s.to - s.from;
            return if n == 0 {
                i as f64
            } else {
                i as f64 + s.at[a - s.from]
            };
        }
    }
    spans.len() as f64
}

/// One drawn state.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    x: f64,
    total: u64,
    cats: [u64; 12],
}

/// Keeps at most [`MAX_POINTS`] samples: one per x bucket, the one with the highest total.
struct Downsample {
    scale: f64,
    on: bool,
    current: Option<(usize, Sample)>,
    out: Vec<Sample>,
}

impl Downsample {
    fn new(spans: &[Span]) -> Downsample {
        let on = visits(spans) > MAX_POINTS;
        Downsample {
            scale: MAX_POINTS as f64 / spans.len().max(1) as f64,
            on,
            current: None,
            out: Vec::with_capacity(visits(spans).min(MAX_POINTS)),
        }
    }
    fn push(&mut self, s: Sample) {
        if !self.on {
            self.out.push(s);
            return;
        }
        let b = ((s.x * self.scale) as usize).min(MAX_POINTS - 1);
        match &mut self.current {
            Some((cb, best)) if *cb == b => {
                if s.total > best.total {
                    *best = s;
                }
            }
            current => {
                if let Some((_, best)) = current.take() {
                    self.out.push(best);
                }
                *current = Some((b, s));
            }
        }
    }
    fn finish(mut self) -> Vec<Sample> {
        if let Some((_, best)) = self.current.take() {
            self.out.push(best);
        }
        self.out
    }
}

/// A trace laid out: its sections, its downsampled states (with categories), the running
/// totals, and which categories are ever non-zero.
struct Laid {
    spans: Vec<Span>,
    samples: Vec<Sample>,
    running: Vec<u64>,
    present: [bool; 12],
}

fn lay_out(trace: &Trace, with_categories: bool) -> Result<Laid> {
    let spans = spans(trace)?;
    let running = trace.running()?;
    let mut ds = Downsample::new(&spans);
    let mut cats = [0u64; 12];
    let mut present = [false; 12];
    let mut done = 0;
    walk(&spans, |x, a| {
        while with_categories && done < a {
            let e = &trace.events[done];
            let slot = &mut cats[e.category.index()];
            *slot = match e.op {
                Op::Alloc => slot.checked_add(e.bytes),
                Op::Free => slot.checked_sub(e.bytes),
            }
            .ok_or_else(|| {
                Error::input(format!(
                    "trace event {done}: tensor {} in category {} does not match the bytes \
                     that category holds (a free must repeat its allocation's category)",
                    e.id,
                    e.category.name()
                ))
            })?;
            present[e.category.index()] |= *slot > 0;
            done += 1;
        }
        let total = if a == 0 { 0 } else { running[a - 1] };
        ds.push(Sample { x, total, cats });
        Ok(())
    })?;
    Ok(Laid {
        spans,
        samples: ds.finish(),
        running,
        present,
    })
}

/// Downsampled reserved bytes on the predicted layout.
fn reserved_samples(spans: &[Span], reserved: &[u64]) -> Result<Vec<Sample>> {
    let mut ds = Downsample::new(spans);
    walk(spans, |x, a| {
        if a > reserved.len() {
            return Ok(());
        }
        let total = if a == 0 { 0 } else { reserved[a - 1] };
        ds.push(Sample {
            x,
            total,
            cats: [0; 12],
        });
        Ok(())
    })?;
    Ok(ds.finish())
}

/// A step line through the samples: each value holds until the next sample's x.
fn steps(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    let mut prev: Option<f64> = None;
    for s in samples {
        let v = value(s);
        if let Some(p) = prev {
            out.push((s.x, p));
        }
        out.push((s.x, v));
        prev = Some(v);
    }
    out
}

/// The unit of the y axis for a largest value: GiB, MiB, KiB or B.
fn unit(max: u64) -> (&'static str, f64) {
    match max {
        m if m >= 1 << 30 => ("GiB", (1u64 << 30) as f64),
        m if m >= 1 << 20 => ("MiB", (1u64 << 20) as f64),
        m if m >= 1 << 10 => ("KiB", 1024.0),
        _ => ("B", 1.0),
    }
}

fn rgb((r, g, b): (u8, u8, u8)) -> RGBColor {
    RGBColor(r, g, b)
}

fn drawing(e: impl std::fmt::Display) -> Error {
    Error::runtime(format!("drawing the memory timeline: {e}"))
}

/// The SVG and the notes about it (e.g. a measured trace with other sections).
fn render(chart: &Chart, titled: bool) -> Result<(String, Vec<String>)> {
    let pred = lay_out(chart.predicted, true).map_err(|e| e.context("predicted trace"))?;
    let n_events = chart.predicted.events.len();
    if let Some(r) = chart.reserved {
        // A simulation that ran out of memory stops at the failing event.
        if r.len() != n_events && Some(r.len()) != chart.oom_at {
            return Err(Error::invalid(
                "reserved",
                format!("{} values", r.len()),
                format!("one per predicted event ({n_events}), or one per event before oom_at"),
            ));
        }
    }
    if let Some(k) = chart.oom_at {
        if k >= n_events {
            return Err(Error::invalid(
                "oom_at",
                k,
                format!("a predicted event index below {n_events}"),
            ));
        }
    }
    let reserved = chart
        .reserved
        .map(|r| reserved_samples(&pred.spans, r))
        .transpose()?;
    let measured = chart
        .measured
        .map(|m| lay_out(m, false).map_err(|e| e.context("measured trace")))
        .transpose()?;

    let mut notes = vec![];
    if let Some(m) = &measured {
        let keys = |s: &[Span]| -> Vec<_> {
            s.iter()
                .filter(|s| s.section.is_some())
                .map(|s| (s.section, s.first_step))
                .collect()
        };
        if keys(&m.spans) != keys(&pred.spans) || m.spans.len() != pred.spans.len() {
            notes.push(format!(
                "The measured trace has other sections than the predicted one ({} against {}): \
                 each is placed by its own order of sections.",
                m.spans.len(),
                pred.spans.len()
            ));
        }
    }

    // The y range and its unit.
    let peak = |s: &[Sample]| s.iter().map(|s| s.total).max().unwrap_or(0);
    let top_bytes = [
        peak(&pred.samples),
        reserved.as_deref().map_or(0, peak),
        measured.as_ref().map_or(0, |m| peak(&m.samples)),
        chart.capacity_bytes.unwrap_or(0),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let (unit_name, unit) = unit(top_bytes);
    let y_top = (top_bytes as f64 / unit * 1.1).max(1.0);
    let x_end = pred
        .spans
        .len()
        .max(measured.as_ref().map_or(0, |m| m.spans.len())) as f64;
    let decimals = if y_top < 10.0 {
        2
    } else if y_top < 100.0 {
        1
    } else {
        0
    };
    let y = |b: u64| b as f64 / unit;

    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let (main, side) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        if titled {
            main.draw(&Text::new(
                chart.title.clone(),
                (16, 10),
                font(20.0).color(&BLACK),
            ))
            .map_err(drawing)?;
        }

        let mut cc = ChartBuilder::on(&main)
            .margin_left(10)
            .margin_right(16)
            .margin_top(if titled { 84 } else { 48 })
            .margin_bottom(if notes.is_empty() { 8 } else { 28 })
            .x_label_area_size(28)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_end, 0f64..y_top)
            .map_err(drawing)?;
        let formatter = |v: &f64| format!("{v:.decimals$}");
        cc.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_desc("step progress: sections side by side; within each, events spread by count and size")
            .y_desc(format!("allocated ({unit_name})"))
            .y_label_formatter(&formatter)
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT)
            .label_style(font(12.0))
            .axis_desc_style(font(13.0))
            .draw()
            .map_err(drawing)?;

        // Stacked areas, the top one first so the lower ones paint over it.
        let shown: Vec<Category> = Category::ALL
            .into_iter()
            .filter(|c| pred.present[c.index()])
            .collect();
        for (j, c) in shown.iter().enumerate().rev() {
            let upto = &shown[..=j];
            let pts = steps(&pred.samples, |s| {
                y(upto.iter().map(|c| s.cats[c.index()]).sum::<u64>())
            });
            cc.draw_series(AreaSeries::new(pts, 0.0, rgb(color(*c)).filled()))
                .map_err(drawing)?;
        }

        // Section separators, darker where a step begins.
        let label_rows = labels(&pred.spans);
        for i in 1..pred.spans.len() {
            let step_starts = pred.spans[i].first_step != pred.spans[i - 1].first_step;
            let style = if step_starts {
                RGBColor(90, 90, 90).stroke_width(1)
            } else {
                RGBColor(170, 170, 170).mix(0.6).stroke_width(1)
            };
            cc.draw_series(std::iter::once(PathElement::new(
                vec![(i as f64, 0.0), (i as f64, y_top)],
                style,
            )))
            .map_err(drawing)?;
        }

        if let Some(r) = &reserved {
            cc.draw_series(LineSeries::new(
                steps(r, |s| y(s.total)),
                rgb(RESERVED_COLOR).stroke_width(2),
            ))
            .map_err(drawing)?;
        }
        if let Some(m) = &measured {
            cc.draw_series(LineSeries::new(
                steps(&m.samples, |s| y(s.total)),
                rgb(MEASURED_COLOR).stroke_width(2),
            ))
            .map_err(drawing)?;
        }
        if let Some(cap) = chart.capacity_bytes {
            cc.draw_series(LineSeries::new(
                vec![(0.0, y(cap)), (x_end, y(cap))],
                rgb(CAPACITY_COLOR).stroke_width(2),
            ))
            .map_err(drawing)?;
            let (px, py) = cc.backend_coord(&(x_end, y(cap)));
            main.draw(&Text::new(
                format!("capacity {}", Bytes(cap)),
                (px - 4, py - 4),
                font(12.0)
                    .color(&rgb(CAPACITY_COLOR))
                    .pos(Pos::new(HPos::Right, VPos::Bottom)),
            ))
            .map_err(drawing)?;
        }
        if let Some(k) = chart.oom_at {
            let x = x_of(&pred.spans, k + 1);
            cc.draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_top)],
                rgb(OOM_COLOR).stroke_width(2),
            )))
            .map_err(drawing)?;
            let (px, py) = cc.backend_coord(&(x, y_top));
            let right = x > x_end * 0.8;
            main.draw(&Text::new(
                "out of memory",
                (if right { px - 5 } else { px + 5 }, py + 4),
                font(13.0)
                    .style(FontStyle::Bold)
                    .color(&rgb(OOM_COLOR))
                    .pos(Pos::new(
                        if right { HPos::Right } else { HPos::Left },
                        VPos::Top,
                    )),
            ))
            .map_err(drawing)?;
        }

        // Phase points at the running total; a label that would overlap an earlier one
        // moves up a line.
        let point_px = 11.0;
        let mut placed: Vec<(i32, i32, i32)> = vec![];
        for m in &chart.predicted.marks {
            let MarkKind::Point { phase } = &m.kind else {
                continue;
            };
            let total = if m.at == 0 { 0 } else { pred.running[m.at - 1] };
            let (px, py) = cc.backend_coord(&(x_of(&pred.spans, m.at), y(total)));
            main.draw(&Circle::new((px, py), 3, rgb(POINT_COLOR).filled()))
                .map_err(drawing)?;
            let (x0, x1) = (px + 4, px + 4 + text_width(phase, point_px) as i32);
            let line = point_px as i32 + 2;
            let mut ty = py - 5;
            while placed
                .iter()
                .any(|&(a, b, y)| a < x1 && x0 < b && (y - ty).abs() < line)
            {
                ty -= line;
            }
            placed.push((x0, x1, ty));
            main.draw(&Text::new(
                phase.clone(),
                (x0, ty),
                font(point_px)
                    .color(&rgb(POINT_COLOR))
                    .pos(Pos::new(HPos::Left, VPos::Bottom)),
            ))
            .map_err(drawing)?;
        }

        // Section labels above the plot: on one line, on two (the step above the name), or
        // short when narrow; none when narrower still.
        let label_px = 12.0;
        let style = font(label_px)
            .color(&RGBColor(60, 60, 60))
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        for (i, label) in label_rows.iter().enumerate() {
            let (x0, top) = cc.backend_coord(&(i as f64, y_top));
            let (x1, _) = cc.backend_coord(&(i as f64 + 1.0, y_top));
            let room = (x1 - x0 - 6) as f64;
            let fits = |s: &str| text_width(s, label_px) <= room;
            let full = label.full();
            let lines: Vec<&str> = if fits(&full) {
                vec![&full]
            } else if let Some(step) = label.step.filter(|s| fits(s) && fits(&label.name)) {
                vec![step, &label.name]
            } else if fits(&label.short) {
                vec![&label.short]
            } else {
                continue;
            };
            let mid = (x0 + x1) / 2;
            for (k, text) in lines.iter().rev().enumerate() {
                main.draw(&Text::new(
                    text.to_string(),
                    (mid, top - 6 - k as i32 * (label_px as i32 + 3)),
                    style.clone(),
                ))
                .map_err(drawing)?;
            }
        }

        if let Some(n) = notes.first() {
            let (_, h) = main.dim_in_pixel();
            main.draw(&Text::new(
                n.clone(),
                (16, h as i32 - 8),
                font(11.0)
                    .color(&RGBColor(90, 90, 90))
                    .pos(Pos::new(HPos::Left, VPos::Bottom)),
            ))
            .map_err(drawing)?;
        }

        legend(&side, &shown, chart, measured.is_some(), reserved.is_some())?;
        root.present().map_err(drawing)?;
    }
    Ok((buf, notes))
}

/// The legend panel: categories (top of the stack first), then the lines.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    shown: &[Category],
    chart: &Chart,
    measured: bool,
    reserved: bool,
) -> Result<()> {
    let font = font(12.0).color(&BLACK);
    let mid = Pos::new(HPos::Left, VPos::Center);
    let mut y = 70;
    for c in shown.iter().rev() {
        area.draw(&Rectangle::new(
            [(8, y), (24, y + 16)],
            rgb(color(*c)).filled(),
        ))
        .map_err(drawing)?;
        area.draw(&Text::new(c.name(), (32, y + 8), font.pos(mid)))
            .map_err(drawing)?;
        y += 24;
    }
    y += 8;
    let lines = [
        (reserved, RESERVED_COLOR, "reserved (simulated)"),
        (measured, MEASURED_COLOR, "measured allocated"),
        (chart.capacity_bytes.is_some(), CAPACITY_COLOR, "capacity"),
        (chart.oom_at.is_some(), OOM_COLOR, "out of memory"),
    ];
    for (on, c, name) in lines {
        if !on {
            continue;
        }
        area.draw(&PathElement::new(
            vec![(8, y + 8), (24, y + 8)],
            rgb(c).stroke_width(2),
        ))
        .map_err(drawing)?;
        area.draw(&Text::new(name, (32, y + 8), font.pos(mid)))
            .map_err(drawing)?;
        y += 24;
    }
    Ok(())
}

/// Text for HTML.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Event, Mark, Module, Owner, Part, Source};

    fn ev(op: Op, id: u64, bytes: u64) -> Event {
        Event {
            op,
            id,
            bytes,
            category: Category::Activations,
            owner: Owner::new(Module::Layer(0), Part::Whole),
            stream: 0,
        }
    }

    fn begin(at: usize, section: Section, micro: u64, first_step: bool) -> Mark {
        Mark {
            at,
            first_step,
            kind: MarkKind::Begin { section, micro },
        }
    }

    fn trace(events: Vec<Event>, marks: Vec<Mark>) -> Trace {
        Trace {
            source: Source::Predicted,
            stage: 0,
            rank: 0,
            capacity_bytes: None,
            events,
            marks,
        }
    }

    #[test]
    fn sections_get_equal_widths_and_events_of_equal_size_spread_evenly_within_them() {
        // setup: 2 events; forward: 4; backward: 0; optimizer: 1 (until End at 7); 1 after.
        // All of 10 bytes: every event weighs 1 + 1, so even spacing.
        let events: Vec<Event> = (0..8).map(|i| ev(Op::Alloc, i, 10)).collect();
        let t = trace(
            events,
            vec![
                begin(0, Section::Setup, 0, true),
                begin(2, Section::Forward, 0, true),
                begin(6, Section::Backward, 0, true),
                begin(6, Section::Optimizer, 0, true),
                Mark {
                    at: 7,
                    first_step: true,
                    kind: MarkKind::End,
                },
            ],
        );
        let s = spans(&t).unwrap();
        let ranges: Vec<_> = s
            .iter()
            .map(|s| (s.section.map(|x| x.0), s.from, s.to))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (Some(Section::Setup), 0, 2),
                (Some(Section::Forward), 2, 6),
                (Some(Section::Backward), 6, 6),
                (Some(Section::Optimizer), 6, 7),
                (None, 7, 8),
            ]
        );
        assert_eq!(x_of(&s, 1), 0.5);
        assert_eq!(x_of(&s, 2), 1.0);
        assert_eq!(x_of(&s, 3), 1.25);
        assert_eq!(x_of(&s, 5), 1.75);
        assert_eq!(x_of(&s, 7), 4.0);
        assert_eq!(x_of(&s, 8), 5.0);
        let l = labels(&s);
        assert_eq!(l[0].full(), "setup");
        assert_eq!(l[1].full(), "step 1 forward");
        assert_eq!(l[1].step, Some("step 1"));
        assert_eq!(l[2].full(), "backward");
        assert_eq!(
            (l[3].full().as_str(), l[3].short.as_str()),
            ("optimizer", "O")
        );
        assert_eq!(l[4].full(), "");
        let mut xs = vec![];
        walk(&s, |x, a| {
            xs.push((x, a));
            Ok(())
        })
        .unwrap();
        assert_eq!(xs.len(), visits(&s));
        assert!(xs.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        // The empty backward holds the state after event 6 across its width.
        assert!(xs.contains(&(2.0, 6)) && xs.contains(&(3.0, 6)));
    }

    #[test]
    fn micro_batches_are_numbered_and_the_steady_step_is_named() {
        let t = trace(
            vec![],
            vec![
                begin(0, Section::Forward, 0, true),
                begin(0, Section::Forward, 1, true),
                begin(0, Section::Backward, 1, true),
                begin(0, Section::Optimizer, 0, true),
                begin(0, Section::Forward, 0, false),
            ],
        );
        let l: Vec<String> = labels(&spans(&t).unwrap())
            .iter()
            .map(Label::full)
            .collect();
        assert_eq!(
            l,
            [
                "step 1 forward 1",
                "forward 2",
                "backward 2",
                "optimizer",
                "steady step forward 1"
            ]
        );
    }

    #[test]
    fn marks_out_of_order_are_an_input_error() {
        let t = trace(
            vec![ev(Op::Alloc, 1, 1)],
            vec![
                begin(1, Section::Forward, 0, true),
                begin(0, Section::Backward, 0, true),
            ],
        );
        assert_eq!(spans(&t).unwrap_err().kind(), crate::error::Kind::Input);
        let t = trace(vec![], vec![begin(3, Section::Forward, 0, true)]);
        assert!(spans(&t).is_err());
    }

    #[test]
    fn downsampling_keeps_the_peak_and_at_most_max_points() {
        // 300,006 events in one forward section, all of 64 bytes (so spread evenly): a
        // sawtooth of tensors allocated and freed in turn, and once, at tensor 61,728, three
        // more on top, freed right after: a peak of 4 tensors one state wide.
        let (n, b) = (150_000u64, 64);
        let mut events = Vec::with_capacity(2 * n as usize + 6);
        for i in 0..n {
            events.push(ev(Op::Alloc, i, b));
            if i == 61_728 {
                (0..3).for_each(|k| events.push(ev(Op::Alloc, u64::MAX - k, b)));
                (0..3).for_each(|k| events.push(ev(Op::Free, u64::MAX - k, b)));
            }
            events.push(ev(Op::Free, i, b));
        }
        let len = events.len();
        let t = trace(
            events,
            vec![
                begin(0, Section::Forward, 0, true),
                begin(len, Section::Backward, 0, true),
            ],
        );
        let laid = lay_out(&t, true).unwrap();
        assert!(laid.samples.len() <= MAX_POINTS, "{}", laid.samples.len());
        assert!(laid.samples.len() > MAX_POINTS / 2);
        let (peak, peak_at) = t.peak().unwrap();
        assert_eq!(peak, 4 * b);
        let best = laid.samples.iter().max_by_key(|s| s.total).unwrap();
        assert_eq!(best.total, peak);
        assert_eq!(best.cats[Category::Activations.index()], peak);
        // Where the peak state lies with even spacing.
        assert!(
            (best.x - peak_at as f64 / len as f64).abs() < 1e-9,
            "{}",
            best.x
        );
        assert!(laid.samples.windows(2).all(|w| w[0].x <= w[1].x));
    }

    /// A span of `events` for [`weigh`] to fill.
    fn weighed(events: &[u64]) -> Vec<f64> {
        let t = trace(
            events
                .iter()
                .enumerate()
                .map(|(i, &b)| ev(Op::Alloc, i as u64, b))
                .collect(),
            vec![],
        );
        let mut s = [Span {
            section: None,
            first_step: true,
            from: 0,
            to: events.len(),
            at: vec![],
        }];
        weigh(&t, &mut s);
        let [s] = s;
        s.at
    }

    #[test]
    fn weigh_gives_each_event_one_plus_its_share_of_the_squared_bytes() {
        // Squares 1, 1, 4 of 6, n = 3: weights 1.5, 1.5, 3 of 6.
        assert_eq!(weighed(&[1, 1, 2]), [0.0, 0.25, 0.5, 1.0]);
        // Equal sizes, and all zero bytes: even.
        assert_eq!(weighed(&[7; 4]), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(weighed(&[0; 4]), [0.0, 0.25, 0.5, 0.75, 1.0]);
        // No events: the one state at 0.
        assert_eq!(weighed(&[]), [0.0]);
    }

    #[test]
    fn one_huge_event_among_many_small_ones_gets_a_third_of_its_section_at_least() {
        // 10,000 tensors of 1-7 KiB, and one of 1 GiB allocated at 5,000: its weight is some
        // 1 + n, of some 2n in all.
        let mut events: Vec<Event> = (0..10_000u64)
            .map(|i| ev(Op::Alloc, i, 1024 * (1 + i % 7)))
            .collect();
        events.insert(5_000, ev(Op::Alloc, u64::MAX, 1 << 30));
        let t = trace(
            events,
            vec![
                begin(0, Section::Forward, 0, true),
                begin(10_001, Section::Backward, 0, true),
            ],
        );
        let s = spans(&t).unwrap();
        let width = x_of(&s, 5_001) - x_of(&s, 5_000);
        assert!(width >= 1.0 / 3.0, "{width}");
        // The sections keep their unit widths.
        assert_eq!(x_of(&s, 0), 0.0);
        assert_eq!(x_of(&s, 10_001), 1.0);
    }

    #[test]
    fn a_free_in_another_category_is_an_error_not_a_panic() {
        let mut free = ev(Op::Free, 1, 10);
        free.category = Category::Logits;
        let t = trace(vec![ev(Op::Alloc, 1, 10), free], vec![]);
        assert!(lay_out(&t, true).is_err());
    }
}
