//! `memplan timeline`: the estimator's step as a picture (SVG, or an HTML page with the
//! breakdown), as a PyTorch memory_viz snapshot, or as the event trace in JSON.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::ValueEnum;

use crate::allocator::AllocConf;
use crate::error::{Error, Result};
use crate::estimate::Estimate;
use crate::output::{memory_viz, timeline};
use crate::plan::Plan;
use crate::trace::Trace;

/// What `timeline` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TimelineFormat {
    /// A picture: the step as stacked areas by category, the capacity line, the
    /// out-of-memory moment, the simulated reserved line.
    Svg,
    /// A self-contained page: the picture and the breakdown at the peak.
    Html,
    /// A `torch.cuda.memory._snapshot()` pickle for pytorch.org/memory_viz and
    /// `torch.cuda._memory_viz`.
    MemoryViz,
    /// The event trace (schema memplan.trace/1).
    Json,
}

impl TimelineFormat {
    fn extension(self) -> &'static str {
        match self {
            TimelineFormat::Svg => "svg",
            TimelineFormat::Html => "html",
            TimelineFormat::MemoryViz => "pickle",
            TimelineFormat::Json => "json",
        }
    }
}

/// The first event at which the simulated allocator runs out of memory, or else the first
/// whose allocated bytes exceed the capacity.
fn oom_at(est: &Estimate, trace: &Trace) -> Result<Option<usize>> {
    if let Some(k) = est.per_gpu.simulation.as_ref().and_then(|s| s.oom_event) {
        return Ok(Some(k));
    }
    let Some(cap) = trace.capacity_bytes else {
        return Ok(None);
    };
    Ok(trace.running()?.iter().position(|&v| v > cap))
}

/// A chart of `trace` (with its estimate) and, when given, a measured trace.
pub fn chart<'a>(
    title: String,
    est: &'a Estimate,
    trace: &'a Trace,
    measured: Option<&'a Trace>,
) -> Result<timeline::Chart<'a>> {
    Ok(timeline::Chart {
        title,
        predicted: trace,
        reserved: est
            .per_gpu
            .simulation
            .as_ref()
            .map(|s| &s.reserved_after[..]),
        measured,
        capacity_bytes: trace.capacity_bytes,
        oom_at: oom_at(est, trace)?,
        breakdown: est
            .per_gpu
            .breakdown
            .items()
            .iter()
            .filter(|(_, b)| b.get() > 0)
            .map(|(n, b)| (n.to_string(), b.get()))
            .collect(),
    })
}

/// Renders the plan's timeline in `format`.
pub fn render(
    plan: &Plan,
    stage: Option<u64>,
    conf_text: &str,
    format: TimelineFormat,
) -> Result<(Vec<u8>, Estimate, Trace)> {
    let conf = AllocConf::parse(conf_text)?;
    // The picture and the snapshot take the tensor-level trace, simulated as drawn.
    let mut est = crate::estimate::estimate(plan)?;
    let s = stage.unwrap_or(est.per_gpu.stage);
    let trace = crate::estimate::trace::trace(plan, s)?;
    est.per_gpu.stage = s;
    est.per_gpu.simulation = if plan.gpu.caching_allocator {
        Some(Box::new(crate::estimate::simulate::simulate(
            &trace, &conf, conf_text,
        )?))
    } else {
        None
    };
    let par = &plan.parallel;
    let stage = if par.pp > 1 {
        format!(", stage {} of {}", est.per_gpu.stage, par.pp)
    } else {
        String::new()
    };
    let title = format!(
        "{} on {} x {}, batch {} x {}{stage}: predicted step, first and steady",
        plan.model.name,
        plan.num_gpus,
        plan.gpu.name,
        plan.batch.micro_batch_size,
        plan.batch.seq_len
    );
    let bytes = match format {
        TimelineFormat::Svg => timeline::svg(&chart(title, &est, &trace, None)?)?.into_bytes(),
        TimelineFormat::Html => timeline::html(&chart(title, &est, &trace, None)?)?.into_bytes(),
        TimelineFormat::Json => trace.to_json().into_bytes(),
        TimelineFormat::MemoryViz => {
            let events = memory_viz::from_trace(&trace, &conf, trace.capacity_bytes)?;
            memory_viz::snapshot(&events, Some(plan.gpu.memory_bytes.get()))?
        }
    };
    Ok((bytes, est, trace))
}

/// Writes `bytes` to `path` ("-": stdout).
pub fn write_to(path: &Path, bytes: &[u8], out: &mut dyn Write) -> Result<()> {
    if path == Path::new("-") {
        out.write_all(bytes)
            .and_then(|_| out.flush())
            .map_err(Error::output)
    } else {
        std::fs::write(path, bytes).map_err(|e| {
            Error::output(e).context(format!(
                "file {}",
                crate::input::quote(&path.display().to_string())
            ))
        })
    }
}

/// The default output file: `memplan-timeline.<ext>` in the working directory.
pub fn default_path(format: TimelineFormat) -> PathBuf {
    PathBuf::from(format!("memplan-timeline.{}", format.extension()))
}

/// The estimator's step of `measured`'s stage as stacked areas, and `measured` as a line
/// over it: an SVG, or with `html` a page. No capacity line: a CPU run's tensors are far
/// below any GPU's.
#[cfg(feature = "trainer")]
fn overlay(plan: &Plan, measured: &Trace, title: String, html: bool) -> Result<String> {
    let mut est = crate::estimate::estimate(plan)?;
    est.per_gpu.stage = measured.stage;
    let mut predicted = crate::estimate::trace::trace(plan, measured.stage)?;
    predicted.capacity_bytes = None;
    let c = chart(title, &est, &predicted, Some(measured))?;
    if html {
        timeline::html(&c)
    } else {
        timeline::svg(&c)
    }
}

/// `validate --timeline DIR`: one picture per validated run that recorded its trace
/// ([`overlay`] of the run's rank); returns the files written.
#[cfg(feature = "trainer")]
pub fn overlays(rows: &[crate::validate::Validation], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::output(e).context(format!(
            "folder {}",
            crate::input::quote(&dir.display().to_string())
        ))
    })?;
    let mut written = Vec::new();
    for v in rows {
        let Some(measured) = &v.measured_trace else {
            continue;
        };
        // A multi-process row's label names its rank already.
        let name: String = v
            .label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let title = format!(
            "{}: predicted (areas) and measured on {} (line)",
            v.label,
            if v.report.processes > 1 {
                format!("rank {}", v.report.rank)
            } else {
                "the emulated rank 0".into()
            }
        );
        let svg = overlay(&v.plan, measured, title, false)?;
        let path = dir.join(format!("{name}.svg"));
        write_to(&path, svg.as_bytes(), &mut std::io::sink())?;
        written.push(path);
    }
    Ok(written)
}

/// `train --trace FILE`: the run's measured trace in the format FILE's extension names: a
/// picture over the estimator's step (`.svg`, `.html`), a memory_viz snapshot (`.pickle`,
/// block addresses from the allocator simulation), or the events (anything else: JSON).
#[cfg(feature = "trainer")]
pub fn write_measured(path: &Path, plan: &Plan, measured: &Trace) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = match ext {
        "svg" | "html" => {
            let title = format!(
                "{}: predicted (areas) and measured on rank {} (line)",
                plan.model.name, measured.rank
            );
            overlay(plan, measured, title, ext == "html")?.into_bytes()
        }
        "pickle" => {
            let events = memory_viz::from_trace(measured, &AllocConf::default(), None)?;
            memory_viz::snapshot(&events, None)?
        }
        _ => measured.to_json().into_bytes(),
    };
    write_to(path, &bytes, &mut std::io::sink())
}
