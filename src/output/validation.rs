//! Rendering of `train` and `validate` results (predicted beside measured), in the three
//! formats. Only built with the trainer.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde::Serialize;

use super::Format;
use crate::units::Bytes;
use crate::validate::Validation;

const PHASES: [&str; 6] = [
    "first forward",
    "first backward",
    "first optimizer",
    "steady forward",
    "steady backward",
    "steady optimizer",
];

fn right(s: impl ToString) -> Cell {
    Cell::new(s.to_string()).set_alignment(CellAlignment::Right)
}

/// One run, phase by phase.
pub fn train(v: &Validation, format: Format) -> String {
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&Envelope {
                schema: "memplan.train/1",
                runs: std::slice::from_ref(v),
            })
            .expect("serializes")
                + "\n"
        }
        Format::Markdown | Format::Table => {
            // CUDA runs also have the caching allocator's reserved peak and the device's use
            // (driver total minus free) per phase.
            let r = &v.report;
            let cuda_phases: Vec<(Option<u64>, Option<u64>)> = [&r.first_step, &r.steady_step]
                .iter()
                .flat_map(|s| match s {
                    Some(s) => [&s.forward, &s.backward, &s.optimizer]
                        .map(|p| (p.peak_reserved_bytes, p.device_used_bytes))
                        .to_vec(),
                    None => vec![(None, None); 3],
                })
                .collect();
            let cuda = cuda_phases.iter().any(|(r, d)| r.is_some() || d.is_some());
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            let mut header = vec!["phase", "predicted", "measured", "error"];
            if cuda {
                header.extend(["measured reserved", "device used"]);
            }
            t.set_header(header);
            for (i, (name, p)) in PHASES.iter().zip(v.phases.iter()).enumerate() {
                // A phase the run never completed (it ran out of memory first) has nothing
                // measured.
                let (measured, error) = if p.measured_bytes == 0 {
                    ("not reached".to_string(), String::new())
                } else {
                    (
                        Bytes(p.measured_bytes).to_string(),
                        format!("{:+.2}%", p.error_pct()),
                    )
                };
                let mut row = vec![
                    Cell::new(name),
                    right(Bytes(p.predicted_bytes)),
                    right(measured),
                    right(error),
                ];
                if cuda {
                    let show = |b: Option<u64>| b.map_or(String::new(), |b| Bytes(b).to_string());
                    row.push(right(show(cuda_phases[i].0)));
                    row.push(right(show(cuda_phases[i].1)));
                }
                t.add_row(row);
            }
            t.add_row(vec![
                Cell::new("peak allocated"),
                right(Bytes(v.peak.predicted_bytes)),
                right(Bytes(v.peak.measured_bytes)),
                right(format!("{:+.2}%", v.peak.error_pct())),
            ]);
            let mut s = format!("{}\n{t}\n", super::plan_summary(&v.plan));
            if let Some(reserved) = r.peak_reserved_bytes {
                s += &format!("measured peak reserved: {}\n", Bytes(reserved));
            }
            s += &format!(
                "losses: {}\n{:.0} tokens/s\n",
                r.losses
                    .iter()
                    .map(|l| format!("{l:.4}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                r.tokens_per_second
            );
            if let Some(oom) = &r.oom {
                // libtorch appends a C++ backtrace to its messages: the first line says it.
                s += &format!(
                    "OUT OF MEMORY at step {} ({:?}): {}\n",
                    oom.step,
                    oom.phase,
                    oom.message.lines().next().unwrap_or_default()
                );
            }
            if let Some(p) = &v.predicted_first_oom {
                s += &format!(
                    "predicted: out of memory at the {} step's {} phase ({} allocated)\n",
                    if p.first_step { "first" } else { "steady" },
                    p.phase.name(),
                    Bytes(p.allocated_bytes.get())
                );
            }
            for n in &r.notes {
                s += &format!("note: {n}\n");
            }
            s
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    schema: &'static str,
    runs: &'a [Validation],
}

/// A matrix: one line per plan.
pub fn matrix(rows: &[Validation], format: Format) -> String {
    // CUDA runs add reserved: predicted for the trainer's one stream, and measured.
    let reserved = rows.iter().any(|v| v.reserved.is_some());
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&Envelope {
                schema: "memplan.validate/1",
                runs: rows,
            })
            .expect("serializes")
                + "\n"
        }
        Format::Markdown => {
            let mut s = String::from(
                "| plan | predicted peak | measured peak | error | worst phase error |",
            );
            s += if reserved {
                " predicted reserved | measured reserved | error |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
            } else {
                "\n|---|---:|---:|---:|---:|\n"
            };
            for v in rows {
                s += &format!(
                    "| {} | {} | {} | {:+.2}% | {:+.2}% |",
                    v.label,
                    v.peak.predicted_bytes,
                    v.peak.measured_bytes,
                    v.error_pct(),
                    worst(v)
                );
                if reserved {
                    s += &match &v.reserved {
                        Some(r) => format!(
                            " {} | {} | {:+.2}% |",
                            r.predicted_bytes,
                            r.measured_bytes,
                            r.error_pct()
                        ),
                        None => " | | |".to_string(),
                    };
                }
                s.push('\n');
            }
            s
        }
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED);
            let mut header = vec![
                "plan",
                "predicted peak",
                "measured peak",
                "error",
                "worst phase",
            ];
            if reserved {
                header.extend(["predicted reserved", "measured reserved", "error"]);
            }
            t.set_header(header);
            for v in rows {
                let mut row = vec![
                    Cell::new(&v.label),
                    right(Bytes(v.peak.predicted_bytes)),
                    right(Bytes(v.peak.measured_bytes)),
                    right(format!("{:+.2}%", v.error_pct())),
                    right(format!("{:+.2}%", worst(v))),
                ];
                if reserved {
                    row.extend(match &v.reserved {
                        Some(r) => [
                            right(Bytes(r.predicted_bytes)),
                            right(Bytes(r.measured_bytes)),
                            right(format!("{:+.2}%", r.error_pct())),
                        ],
                        None => [Cell::new(""), Cell::new(""), Cell::new("")],
                    });
                }
                t.add_row(row);
            }
            let within = rows.iter().filter(|v| v.error_pct().abs() <= 3.0).count();
            format!(
                "{t}\n{within} of {} plans within 3% on peak allocated\n",
                rows.len()
            )
        }
    }
}

/// The phase error of largest magnitude.
pub fn worst(v: &Validation) -> f64 {
    v.phases
        .iter()
        .map(|p| p.error_pct())
        .fold(0.0, |a: f64, b| if b.abs() > a.abs() { b } else { a })
}

/// The ranks of one multi-process run, each beside the prediction (the estimator's figure is
/// for the most loaded rank, so every rank is compared with it), with the most loaded rank and
/// the host bytes per node (the sum of its ranks' host peaks).
pub fn ranks(rows: &[Validation], format: Format) -> String {
    // The lowest rank of those with the highest peak.
    let most = rows
        .iter()
        .fold(None::<&Validation>, |best, v| match best {
            Some(b) if b.report.peak_allocated_bytes >= v.report.peak_allocated_bytes => Some(b),
            _ => Some(v),
        })
        .map_or(0, |v| v.report.rank);
    let per_node = rows.first().map_or(1, |v| v.plan.gpus_per_node.max(1));
    let mut host: Vec<(u64, u64)> = Vec::new();
    for v in rows {
        let node = v.report.rank / per_node;
        match host.iter_mut().find(|(n, _)| *n == node) {
            Some((_, b)) => *b += v.report.peak_host_bytes,
            None => host.push((node, v.report.peak_host_bytes)),
        }
    }
    match format {
        Format::Json => {
            #[derive(Serialize)]
            struct Node {
                node: u64,
                host_peak_bytes: u64,
            }
            #[derive(Serialize)]
            struct Ranks<'a> {
                schema: &'static str,
                most_loaded_rank: u64,
                host_per_node: Vec<Node>,
                ranks: &'a [Validation],
            }
            serde_json::to_string_pretty(&Ranks {
                schema: "memplan.train-ranks/1",
                most_loaded_rank: most,
                host_per_node: host
                    .iter()
                    .map(|&(node, host_peak_bytes)| Node {
                        node,
                        host_peak_bytes,
                    })
                    .collect(),
                ranks: rows,
            })
            .expect("serializes")
                + "\n"
        }
        Format::Markdown | Format::Table => {
            let mut t = Table::new();
            t.load_preset(if format == Format::Markdown {
                comfy_table::presets::ASCII_MARKDOWN
            } else {
                UTF8_FULL_CONDENSED
            });
            t.set_header(vec![
                "rank",
                "predicted (most loaded rank)",
                "measured peak",
                "error",
                "worst phase",
                "loss (last)",
            ]);
            for v in rows {
                let r = &v.report;
                let (measured, error, worst_phase) = match &r.oom {
                    Some(o) => (
                        format!("out of memory at step {}, {:?}", o.step, o.phase),
                        String::new(),
                        String::new(),
                    ),
                    None => (
                        Bytes(v.peak.measured_bytes).to_string(),
                        format!("{:+.2}%", v.error_pct()),
                        format!("{:+.2}%", worst(v)),
                    ),
                };
                t.add_row(vec![
                    Cell::new(r.rank),
                    right(Bytes(v.peak.predicted_bytes)),
                    right(measured),
                    right(error),
                    right(worst_phase),
                    right(r.losses.last().map_or(String::new(), |l| format!("{l:.4}"))),
                ]);
            }
            let mut s = format!("{t}\n");
            s += &format!("most loaded: rank {most}");
            for (node, b) in &host {
                s += &format!("; host on node {node}: {}", Bytes(*b));
            }
            s += "\n";
            if let Some(v) = rows.iter().find(|v| v.report.oom.is_some()) {
                let o = v.report.oom.as_ref().expect("found with an oom");
                s += &format!(
                    "OUT OF MEMORY on rank {} at step {}, {:?}: {}\n",
                    v.report.rank, o.step, o.phase, o.message
                );
            }
            s
        }
    }
}
